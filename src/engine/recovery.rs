//! Recovery at mount (after a clean unmount, a kill -9 or a power cut) and the clean
//! shutdown. docs/design.md, "Crash safety" and "Power-loss safety", tells the story.

use log::{error, warn};

use super::{Engine, Result};
use crate::catalog::model::now_ns;
use crate::catalog::model::{Body, Catalog, JobRec, Op};
use crate::extent_map::ExtentMap;
use crate::geometry::TrackNo;
use crate::layout::Layout;

/// What recovery did.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    /// Switched jobs whose source was freed.
    pub jobs_released: Vec<u64>,
    /// Jobs that had not switched, rolled back (target freed, source untouched).
    pub jobs_rolled_back: Vec<u64>,
    /// Rolled-back jobs queued again from the start: (old id, new id, path).
    pub jobs_requeued: Vec<(u64, u64, String)>,
    /// Rolled-back jobs whose data set is gone (nothing to start again).
    pub jobs_dropped: Vec<(u64, String)>,
    /// Jobs kept with their target, to resume from their checkpoint under their own id.
    pub jobs_resumed: Vec<u64>,
    pub orphans_freed: usize,
    /// After an unclean stop: data sets whose bytes past their size were zeroed, and free
    /// runs zeroed.
    pub tails_zeroed: u64,
    pub free_runs_zeroed: u64,
}

impl Engine {
    /// Bring the catalog and the volumes to a consistent state before anything is served:
    /// settle every job record, free orphans, make all that durable (a compaction), and,
    /// after an unclean stop (`unclean`), zero what a crash may have left behind: bytes past
    /// each data set's size and every free track.
    pub fn recover(&self, unclean: bool) -> Result<RecoveryReport> {
        let mut r = RecoveryReport::default();
        self.settle_jobs(&mut r)?;
        r.orphans_freed = self.destroy_orphans()?;
        {
            // Nothing to fold after a clean unmount that left an empty log (and nothing
            // settled above): the snapshot already holds it all, durably.
            let mut cat = self.catalog.lock();
            if !cat.folded() {
                cat.compact()?;
            }
        }
        // Everything freed so far is durably free now: zero it (a rolled-back job's target
        // holds a copy of its data set) before anything can be handed out.
        let freed = std::mem::take(&mut *self.quarantine.lock());
        self.punch_freed(&freed);
        self.flush_extents_volumes(&freed)?;
        if unclean {
            r.tails_zeroed = self.zero_tails()?;
            r.free_runs_zeroed = self.zero_free_space()?;
            // Free tracks read as zeros *durably* from here on: a track handed out later may
            // be named by a durable Grow before its new owner's bytes reach the disk.
            self.flush_volumes()?;
        }
        Ok(r)
    }

    /// Every job the catalog holds: a switched job frees its source; one with a checkpoint
    /// it can resume from keeps its record and its target (`migrate::resume` starts it again
    /// under its own id, from the checkpoint); any other is rolled
    /// back (target freed, source untouched: it held every acknowledged write). A rolled-back
    /// job of its own (not a plan's: a plan re-plans) is queued again in the same breath, as
    /// a new record, so that a mount that fails after recovery loses no job: the next one
    /// finds the queued record and starts it.
    fn settle_jobs(&self, r: &mut RecoveryReport) -> Result<()> {
        let mut cat = self.catalog.lock();
        let jobs: Vec<JobRec> = cat.catalog.jobs.values().cloned().collect();
        for j in jobs {
            if j.switched {
                self.commit(&mut cat, Op::JobRelease { job: j.id })?;
                warn!("job {} ({}) had switched; freed its source", j.id, j.path);
                r.jobs_released.push(j.id);
                continue;
            }
            if resumable(&cat.catalog, &j) {
                warn!("job {} ({}) had not switched; it resumes from its checkpoint", j.id, j.path);
                r.jobs_resumed.push(j.id);
                continue;
            }
            self.commit(&mut cat, Op::JobCancel { job: j.id })?;
            warn!("job {} ({}) had not switched; rolled back (target freed)", j.id, j.path);
            r.jobs_rolled_back.push(j.id);
            if j.plan.is_some() {
                continue;
            }
            let alive = cat.catalog.get(j.ino).is_some_and(|i| i.meta.nlink > 0 && matches!(i.body, Body::File { .. }));
            if !alive {
                r.jobs_dropped.push((j.id, j.path.clone()));
                continue;
            }
            let id = cat.catalog.next_job;
            let again = JobRec {
                id,
                target: Layout::default(),
                release: Vec::new(),
                switched: false,
                started_ns: now_ns(),
                ..j.clone()
            };
            self.commit(&mut cat, Op::JobStart { job: again })?;
            r.jobs_requeued.push((j.id, id, j.path.clone()));
        }
        Ok(())
    }

    /// Free inodes left without links by a mount that stopped while they were open.
    fn destroy_orphans(&self) -> Result<usize> {
        let mut cat = self.catalog.lock();
        let orphans = cat.catalog.orphans();
        for ino in &orphans {
            self.commit(&mut cat, Op::Destroy { ino: *ino })?;
        }
        Ok(orphans.len())
    }

    /// Zero every byte past each data set's size inside its allocation: after a crash, a write
    /// that landed on the volume but whose size change never reached the log left bytes there.
    fn zero_tails(&self) -> Result<u64> {
        let g = self.geometry;
        let cat = self.catalog.lock();
        let mut n = 0;
        // In inode order, so that the I/O is the same every run (simulation seeds replay).
        let mut inodes: Vec<_> = cat.catalog.inodes.values().collect();
        inodes.sort_unstable_by_key(|i| i.ino);
        for i in inodes {
            if let Body::File { size_bytes, layout, .. } = &i.body {
                let map = ExtentMap::new(g, layout);
                let end = map.end_bytes();
                if end > *size_bytes {
                    super::io::zero_pieces(&self.volumes.read(), &map, *size_bytes..end)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Zero every free run, since a crash can land between a free's log frame and its punch,
    /// and a power cut can drop a punch.
    fn zero_free_space(&self) -> Result<u64> {
        let g = self.geometry;
        let cat = self.catalog.lock();
        let mut runs = 0;
        for v in cat.catalog.volumes.values() {
            let io = self.volume(v.id)?;
            for (first, count) in v.free.runs() {
                io.punch(g.track_offset(TrackNo(first)), g.bytes_of(count))?;
                runs += 1;
            }
        }
        Ok(runs)
    }

    /// Flush every volume.
    pub fn flush_volumes(&self) -> Result<()> {
        for v in self.volumes().values() {
            v.flush()?;
        }
        Ok(())
    }

    /// Clean shutdown (the migrations have stopped): persist mtimes, flush the volumes, trim
    /// over-provisioned tails, fold the log into a snapshot, zero what is durably free, and
    /// cut the rings off. [`Engine::stopped_cleanly`] says whether the fold succeeded.
    pub fn shutdown(&self) {
        for n in self.nodes_snapshot() {
            if let Err(e) = self.persist_mtime(&n) {
                warn!("persisting mtime of {}: {e}", n.ino);
            }
        }
        for v in self.volumes().values() {
            if let Err(e) = v.flush() {
                error!("flushing a volume at unmount: {e}");
            }
        }
        let mut cat = self.catalog.lock();
        self.open_inodes.lock().clear();
        if let Err(e) = self.reclaim_surplus(&mut cat) {
            error!("trimming over-provisioned tails at unmount: {e}");
        }
        if let Err(e) = cat.compact() {
            error!("compacting the catalog at unmount: {e}");
            return;
        }
        self.stopped_cleanly.store(true, std::sync::atomic::Ordering::Release);
        let freed = std::mem::take(&mut *self.quarantine.lock());
        self.punch_freed(&freed);
        // The compaction holds everything the rings kept: cut them off (this mount's, and
        // any an unclean stop left), so that the next mount reads none (catalog/ring.rs).
        for v in cat.catalog.volumes.values().filter(|v| crate::catalog::ring::has_ring(v)) {
            let cut = self.volume(v.id).and_then(|io| {
                // Only an image longer than its tracks has a ring: a cut is a change the
                // flush below would sync, and most images have none.
                if io.size_bytes() > v.size_bytes {
                    io.set_len(v.size_bytes)?;
                }
                Ok(())
            });
            if let Err(e) = cut {
                warn!("cutting the ring off volume {}: {e}", v.name);
            }
        }
        for v in self.volumes().values() {
            if let Err(e) = v.flush() {
                error!("flushing a volume at unmount: {e}");
            }
        }
    }
}

/// Whether an unswitched job can resume from its checkpoint: it has one, its data set is
/// alive, and every volume of its target reservation is in the pool with the reservation
/// inside it, covering the checkpoint's copy mark. Any other job is rolled back.
fn resumable(c: &Catalog, j: &JobRec) -> bool {
    let Some(cp) = c.checkpoints.get(&j.id) else { return false };
    let alive = c.get(j.ino).is_some_and(|i| i.meta.nlink > 0 && matches!(i.body, Body::File { .. }));
    let volumes_there =
        j.target.extents().all(|e| c.volumes.get(&e.volume).is_some_and(|v| e.end().0 <= v.free.tracks_total()))
            && j.targets.iter().all(|v| c.volumes.contains_key(v));
    // The copy mark lies inside the logical tracks the data set or its target reach.
    let reach = match c.get(j.ino).map(|i| &i.body) {
        Some(Body::File { layout, prealloc_end, size_bytes }) => {
            layout.end().max(*prealloc_end).max(c.geometry.tracks_for(*size_bytes)).max(j.target.end())
        }
        _ => 0,
    };
    alive && volumes_there && cp.region_tracks > 0 && cp.copied_tracks <= reach
}
