//! The write path's half of a job's checkpoint (md's write-intent bitmap; the copier's half
//! is in migrate/job.rs, the story in docs/design.md, "Resuming a job").
//!
//! A resumed job trusts its target below the checkpointed copy mark, except in the regions
//! the log holds dirty. So before a change to a data set reaches a track below that mark in
//! a region the log holds clean, the region is logged dirty (`Op::JobIntent`) and the log is
//! synced: the bit is durable before the data write. After the change landed, the region is
//! *touched*, which keeps it dirty in the next checkpoint (a mirrored write may not be on
//! the disk when that checkpoint is).
//!
//! Both run with the data set's write hold taken shared, and a checkpoint takes it
//! exclusively: no change is between its intent and its touch while a checkpoint is taken.

use std::ops::Range;

use super::{Engine, FileNode, Result};
use crate::catalog::model::Op;

impl Engine {
    /// Before logical bytes `changed` of `node` change: log (and sync) the intent regions
    /// the change needs. A no-op without a job, or when every region is logged already.
    pub(super) fn intend(&self, node: &FileNode, changed: Range<u64>) -> Result<()> {
        let link = node.job.load();
        let Some(l) = link.as_ref().filter(|_| changed.end > changed.start) else { return Ok(()) };
        let g = self.geometry;
        let (first, last) = (g.track_of(changed.start).0, g.track_of(changed.end - 1).0);
        if l.intent.needed(first, last).is_empty() {
            return Ok(());
        }
        let _serial = l.intent.serial.lock();
        let regions = l.intent.needed(first, last);
        if regions.is_empty() {
            return Ok(());
        }
        {
            let mut cat = self.catalog.lock();
            self.commit(&mut cat, Op::JobIntent { job: l.job, regions: regions.clone() })?;
        }
        self.sync_log()?;
        l.intent.logged(&regions);
        Ok(())
    }

    /// After logical bytes `changed` of `node` changed (on the source, and the target if
    /// mirrored): keep their regions dirty in the job's next checkpoint.
    pub(super) fn touched(&self, node: &FileNode, changed: Range<u64>) {
        let link = node.job.load();
        if let Some(l) = link.as_ref().filter(|_| changed.end > changed.start) {
            let g = self.geometry;
            l.intent.touch(g.track_of(changed.start).0, g.track_of(changed.end - 1).0);
        }
    }
}
