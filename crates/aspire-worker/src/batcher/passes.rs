//! Forward passes in progress, so that one running past the slow-pass threshold shows
//! while it still runs (a pass that never returns would otherwise never be seen).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A pass in progress.
#[derive(Debug)]
struct Running {
    id: u64,
    started: Instant,
    /// Already counted in `slow_total`.
    counted: bool,
}

/// The forward passes a version runs now, and how many of its passes were slow.
#[derive(Debug, Default)]
pub struct PassWatch {
    running: Mutex<Vec<Running>>,
    next_id: AtomicU64,
    slow_total: AtomicU64,
    /// Nanoseconds; 0 means "never slow" (no threshold set).
    threshold_nanos: AtomicU64,
}

/// What [`PassWatch::check`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlowPasses {
    /// Passes running now for longer than the threshold.
    pub running: u64,
    /// Passes that ran past the threshold since the version loaded (those running now
    /// included).
    pub total: u64,
}

impl PassWatch {
    fn lock(&self) -> MutexGuard<'_, Vec<Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// From now on a pass running longer than `threshold` is slow; zero turns it off.
    pub fn set_threshold(&self, threshold: Duration) {
        let nanos = u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX);
        self.threshold_nanos.store(nanos, Ordering::Relaxed);
    }

    fn threshold(&self) -> Option<Duration> {
        match self.threshold_nanos.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }

    /// A pass starts; call [`Self::end`] with the id when it returns.
    pub(super) fn begin(&self, started: Instant) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().push(Running {
            id,
            started,
            counted: false,
        });
        id
    }

    /// The pass `id` returned; it counts as slow if it took longer than the threshold
    /// and was not counted while it ran.
    pub(super) fn end(&self, id: u64) {
        let mut running = self.lock();
        let Some(i) = running.iter().position(|r| r.id == id) else {
            return;
        };
        let pass = running.swap_remove(i);
        drop(running);
        if !pass.counted && self.threshold().is_some_and(|t| pass.started.elapsed() > t) {
            self.slow_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts the passes that have just gone past the threshold, and says how many run
    /// past it now.
    pub fn check(&self, now: Instant) -> SlowPasses {
        let Some(threshold) = self.threshold() else {
            return SlowPasses::default();
        };
        let mut slow = 0;
        for pass in self.lock().iter_mut() {
            if now.saturating_duration_since(pass.started) > threshold {
                slow += 1;
                if !pass.counted {
                    pass.counted = true;
                    self.slow_total.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        SlowPasses {
            running: slow,
            total: self.slow_total.load(Ordering::Relaxed),
        }
    }

    /// Passes running now, slow or not.
    pub fn running(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_is_slow_while_it_runs_and_counted_once() {
        let watch = PassWatch::default();
        let start = Instant::now();
        let id = watch.begin(start);
        assert_eq!(watch.check(start), SlowPasses::default());
        watch.set_threshold(Duration::from_secs(1));
        let later = start + Duration::from_secs(2);
        assert_eq!(
            watch.check(later),
            SlowPasses {
                running: 1,
                total: 1
            }
        );
        assert_eq!(
            watch.check(later),
            SlowPasses {
                running: 1,
                total: 1
            }
        );
        watch.end(id);
        assert_eq!(
            watch.check(later),
            SlowPasses {
                running: 0,
                total: 1
            }
        );
        assert_eq!(watch.running(), 0);
    }

    #[test]
    fn a_slow_pass_seen_only_at_its_end_still_counts() {
        let watch = PassWatch::default();
        watch.set_threshold(Duration::from_nanos(1));
        let id = watch.begin(Instant::now() - Duration::from_millis(5));
        watch.end(id);
        assert_eq!(watch.check(Instant::now()).total, 1);
    }
}
