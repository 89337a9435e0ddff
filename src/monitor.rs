//! The dirty-track bitmap: the monitor that the write path feeds while a data set is being
//! migrated. One bit per logical track of the data set, in 64-bit atomic words.
//!
//! Marking is a `fetch_or` on one word: lock-free, no system call. The write path marks a
//! track *after* its bytes reached the source volume; a copier takes-and-clears a word
//! (`swap(0)`) *before* reading the tracks it covers. So a write either completed before the
//! copier's read (and the read sees it) or it sets the bit again after the clear (and the
//! track is copied again): no write can slip between the read and the clear.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::geometry::TrackNo;

/// Bits per bitmap word: one `fetch_or`/`swap` covers this many tracks.
pub const WORD_BITS: u64 = 64;

#[derive(Debug)]
pub struct DirtyBitmap {
    words: Vec<AtomicU64>,
    tracks: u64,
}

impl DirtyBitmap {
    pub fn new(tracks: u64) -> DirtyBitmap {
        let n = tracks.div_ceil(WORD_BITS) as usize;
        DirtyBitmap { words: (0..n).map(|_| AtomicU64::new(0)).collect(), tracks }
    }

    pub fn tracks(&self) -> u64 {
        self.tracks
    }

    /// Mark tracks `first..=last`. Tracks past the bitmap's end are ignored (growth past the
    /// assessed size is handled by the job, not the bitmap).
    pub fn mark(&self, first: TrackNo, last: TrackNo) {
        let last = last.0.min(self.tracks.saturating_sub(1));
        let mut t = first.0;
        while t <= last && t < self.tracks {
            let w = t / WORD_BITS;
            let lo = t % WORD_BITS;
            let hi = (last - w * WORD_BITS).min(WORD_BITS - 1);
            let mask = if hi - lo == WORD_BITS - 1 { u64::MAX } else { ((1u64 << (hi - lo + 1)) - 1) << lo };
            self.words[w as usize].fetch_or(mask, Ordering::AcqRel);
            t = (w + 1) * WORD_BITS;
        }
    }

    /// Take and clear word `w`: the tracks whose bits were set.
    pub fn take_word(&self, w: usize) -> u64 {
        self.words[w].swap(0, Ordering::AcqRel)
    }

    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    pub fn count_dirty(&self) -> u64 {
        self.words.iter().map(|w| w.load(Ordering::Acquire).count_ones() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_spans_words_and_take_clears() {
        let b = DirtyBitmap::new(200);
        b.mark(TrackNo(60), TrackNo(130));
        assert_eq!(b.count_dirty(), 71);
        assert_eq!(b.take_word(0), 0xF << 60);
        assert_eq!(b.take_word(1), u64::MAX);
        assert_eq!(b.take_word(2), 0b111);
        assert_eq!(b.count_dirty(), 0);
        b.mark(TrackNo(199), TrackNo(500));
        assert_eq!(b.count_dirty(), 1);
    }
}
