//! Who waits for the jobs and plans to change. A reader of `.ferry/status` or `.ferry/events`
//! may poll(2) its open file for `POLLPRI`, as for a sysfs attribute: the file is ready once a
//! job or a plan changed phase, or an event was logged, after it was opened; the reader then
//! opens it again for what changed. `ferryfs migrate --wait` and `ferryfs wait` sleep in that
//! poll, so they return as the job ends, not at their next look.

use std::collections::HashMap;

use parking_lot::Mutex;

/// What wakes one waiter: through a mount, a poll notification to the kernel.
pub type Wake = Box<dyn FnOnce() + Send>;

#[derive(Default)]
pub struct Changes {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Counts the changes.
    generation: u64,
    /// The waiters until the next change, by their open file: at most one each, and
    /// forgotten when the file closes, so a reader that polls, closes and opens again
    /// while nothing changes leaves nothing behind.
    waiting: HashMap<u64, Wake>,
}

impl Changes {
    /// Where a reader starts: what it reads next shows at least this change.
    pub fn generation(&self) -> u64 {
        self.inner.lock().generation
    }

    /// Something a reader may wait for changed: every waiter is woken (outside the lock).
    pub fn changed(&self) {
        let woken = {
            let mut i = self.inner.lock();
            i.generation += 1;
            std::mem::take(&mut i.waiting)
        };
        for wake in woken.into_values() {
            wake();
        }
    }

    /// Whether anything changed after generation `seen`. If not, `wake` (when given) runs at
    /// the next change, in place of what `key` waited with before. The check and the
    /// registration are one step, so no change falls between them.
    pub fn changed_since(&self, seen: u64, key: u64, wake: Option<Wake>) -> bool {
        let mut i = self.inner.lock();
        if i.generation != seen {
            return true;
        }
        if let Some(w) = wake {
            i.waiting.insert(key, w);
        }
        false
    }

    /// `key`'s file closed: it waits no more.
    pub fn forget(&self, key: u64) {
        self.inner.lock().waiting.remove(&key);
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.inner.lock().waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    fn counter() -> (Arc<AtomicUsize>, impl Fn() -> Wake) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        (n, move || {
            let m = m.clone();
            Box::new(move || {
                m.fetch_add(1, Ordering::SeqCst);
            })
        })
    }

    #[test]
    fn a_waiter_is_woken_once_by_the_next_change() {
        let c = Changes::default();
        let (woken, wake) = counter();
        let seen = c.generation();
        assert!(!c.changed_since(seen, 1, Some(wake())));
        assert_eq!(woken.load(Ordering::SeqCst), 0);
        c.changed();
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        // The next poll of the same open file finds the change without waiting.
        assert!(c.changed_since(seen, 1, Some(wake())));
        c.changed();
        assert_eq!(woken.load(Ordering::SeqCst), 1, "a waiter is woken once, then polls again");
    }

    #[test]
    fn a_change_before_the_poll_is_seen_at_once() {
        let c = Changes::default();
        let (woken, wake) = counter();
        let seen = c.generation();
        c.changed();
        assert!(c.changed_since(seen, 7, Some(wake())));
        assert_eq!(c.waiting(), 0, "nothing to wait for: not registered");
        assert_eq!(woken.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn one_waiter_per_open_file_and_none_after_it_closes() {
        let c = Changes::default();
        let (woken, wake) = counter();
        let seen = c.generation();
        for _ in 0..5 {
            assert!(!c.changed_since(seen, 3, Some(wake())));
        }
        assert!(!c.changed_since(seen, 4, Some(wake())));
        assert_eq!(c.waiting(), 2);
        c.forget(3);
        assert_eq!(c.waiting(), 1);
        c.changed();
        assert_eq!(woken.load(Ordering::SeqCst), 1, "only the open file still waiting is woken");
        assert_eq!(c.waiting(), 0);
    }
}
