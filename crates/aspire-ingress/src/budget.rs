//! A process-wide budget of request bytes in flight, and the per-request reservation
//! that holds a share of it until the request is answered.
//!
//! A request charges its bytes as they arrive ([`crate::layer`]) and, on a worker, the
//! bytes its tensors take once decoded; all of it goes back when the last handle on its
//! [`RequestBudget`] is dropped. A charge that would take the total past the limit fails
//! at once: the caller sheds the request rather than wait for room.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes in flight in one process, against a limit.
#[derive(Debug)]
pub struct InflightBudget {
    limit: usize,
    used: AtomicUsize,
    /// What the budget is, for messages: "the worker's in-flight budget".
    what: &'static str,
    /// The flag that sets `limit`.
    flag: &'static str,
}

impl InflightBudget {
    /// A budget of `limit` bytes; `what` and `flag` name it in errors.
    pub fn new(limit: usize, what: &'static str, flag: &'static str) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            what,
            flag,
        })
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// A new, empty reservation on this budget.
    pub fn reserve(self: &Arc<Self>) -> RequestBudget {
        RequestBudget(Arc::new(Reservation {
            budget: Arc::clone(self),
            held: AtomicUsize::new(0),
        }))
    }

    /// Takes `bytes` if they fit; the error is the sentence a client gets with
    /// RESOURCE_EXHAUSTED.
    fn take(&self, bytes: usize) -> Result<(), String> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let wanted = used.saturating_add(bytes);
            if wanted > self.limit {
                return Err(format!(
                    "{} is full: {used} bytes of requests in flight, this one needs {bytes} more, the limit is {} bytes ({}); retry later",
                    self.what, self.limit, self.flag
                ));
            }
            match self
                .used
                .compare_exchange_weak(used, wanted, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One request's share of an [`InflightBudget`]. Clones share it; the bytes go back
/// when the last clone is dropped. Servers put it in the request's extensions, so the
/// handler can charge more (decoded tensors) and keep it until it answers.
#[derive(Debug, Clone)]
pub struct RequestBudget(Arc<Reservation>);

#[derive(Debug)]
struct Reservation {
    budget: Arc<InflightBudget>,
    held: AtomicUsize,
}

impl RequestBudget {
    /// Charges `bytes` more to the budget, or fails with the sentence for the client
    /// (RESOURCE_EXHAUSTED) and charges nothing.
    pub fn charge(&self, bytes: usize) -> Result<(), String> {
        if bytes == 0 {
            return Ok(());
        }
        self.0.budget.take(bytes)?;
        self.0.held.fetch_add(bytes, Ordering::AcqRel);
        Ok(())
    }

    /// Bytes this request holds.
    pub fn held(&self) -> usize {
        self.0.held.load(Ordering::Relaxed)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(*self.held.get_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_up_to_the_limit_and_gives_back_on_drop() {
        let budget = InflightBudget::new(100, "the test budget", "--test-budget");
        let a = budget.reserve();
        a.charge(60).unwrap();
        let b = budget.reserve();
        let err = b.charge(41).unwrap_err();
        assert!(
            err.contains("the test budget is full")
                && err.contains("60 bytes")
                && err.contains("41 more")
                && err.contains("100 bytes (--test-budget)"),
            "{err}"
        );
        assert_eq!((budget.used(), b.held()), (60, 0));
        b.charge(40).unwrap();
        assert_eq!(budget.used(), 100);
        let a2 = a.clone();
        drop(a);
        assert_eq!(budget.used(), 100, "a clone still holds the bytes");
        drop(a2);
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn concurrent_charges_never_pass_the_limit() {
        let budget = InflightBudget::new(1000, "b", "--b");
        let held: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let budget = Arc::clone(&budget);
                    s.spawn(move || {
                        let r = budget.reserve();
                        let mut ok = 0;
                        for _ in 0..100 {
                            if r.charge(7).is_ok() {
                                ok += 7;
                            }
                        }
                        (r, ok)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let total: usize = held.iter().map(|(_, ok)| ok).sum();
        assert!(total <= 1000 && total > 990, "{total}");
        assert_eq!(budget.used(), total);
        drop(held);
        assert_eq!(budget.used(), 0);
    }
}
