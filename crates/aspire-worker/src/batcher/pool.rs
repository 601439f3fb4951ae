//! The batch threads: a pool shared by the queues of every loaded version, as TensorFlow
//! Serving's shared batch scheduler shares `num_batch_threads` among its models.
//!
//! Why shared: LibTorch runs each forward pass on the calling thread plus its own OpenMP
//! team, and libgomp stops spinning (and sleeps in `futex` between parallel regions)
//! once it manages more threads than there are CPUs. With a pool per version, two models
//! with two batch threads each made four OpenMP teams on a 2-core machine, and every
//! layer of ResNet-18 paid for a wake-up: a forward pass took 28 ms in the worker against
//! 19 ms in-process. One pool keeps the number of teams at `threads`, whatever the number
//! of models.
//!
//! A thread takes the next due batch from the queues in round-robin order (so one busy
//! model cannot starve another), runs it, and looks again; with nothing due it polls for
//! a moment, then sleeps on one condition variable that every queue signals when a
//! request arrives or it closes.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::queue::{Scratch, Shared, Take};
use super::run;
use crate::model::Servable;

thread_local! {
    /// Set on pool threads, so a batcher shut down from inside a forward pass does not
    /// wait for itself.
    static ON_POOL_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is a batch thread.
pub(super) fn on_pool_thread() -> bool {
    ON_POOL_THREAD.with(Cell::get)
}

/// A pool of batch threads that any number of version queues can join.
pub struct BatchPool {
    signal: Arc<Signal>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for BatchPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchPool")
            .field("threads", &self.threads())
            .finish_non_exhaustive()
    }
}

impl BatchPool {
    /// Starts `threads` batch threads (at least 1). Panics only if the OS cannot start a
    /// thread.
    pub fn new(threads: usize) -> Self {
        let signal = Arc::new(Signal::default());
        let handles = (0..threads.max(1))
            .map(|i| {
                let signal = Arc::clone(&signal);
                thread::Builder::new()
                    .name(format!("aspire-batch-{i}"))
                    .spawn(move || pool_thread(&signal))
                    .expect("the OS refused to start a batch thread")
            })
            .collect();
        Self {
            signal,
            threads: Mutex::new(handles),
        }
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub(super) fn signal(&self) -> &Arc<Signal> {
        &self.signal
    }

    /// Lets the threads exit once every queue has left, and waits for them (unless
    /// called from one of them).
    pub(super) fn stop_and_join(&self) {
        self.signal.stop();
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        if on_pool_thread() {
            return;
        }
        for handle in threads.drain(..) {
            // The thread catches panics itself; an error here has nothing to report.
            let _ = handle.join();
        }
    }
}

impl Drop for BatchPool {
    /// Lets the threads exit once every queue has left, without waiting for them.
    fn drop(&mut self) {
        self.signal.stop();
    }
}

/// A version's queue and the model its batches run on.
struct Member {
    shared: Arc<Shared>,
    model: Arc<dyn Servable>,
}

#[derive(Default)]
struct PoolState {
    members: Vec<Member>,
    /// Where the next round-robin scan starts.
    next: usize,
    /// A queue changed since the last scan began.
    pending: bool,
    /// The pool's owner is gone: exit once no queue is left.
    stopping: bool,
    /// Threads waiting on the condition variable: with none, a notification is only the
    /// `pending` flag, not a `futex` wake (a system call per request under load).
    sleeping: usize,
}

/// What pool threads sleep on and queues signal.
#[derive(Default)]
pub(super) struct Signal {
    state: Mutex<PoolState>,
    wake: Condvar,
    /// `pending`, readable without the lock by a thread polling before it sleeps.
    hint: AtomicBool,
}

impl Signal {
    // A panic is never raised with the lock held; if one were, the list is still valid.
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a queue whose batches run `model`.
    pub(super) fn join(&self, shared: Arc<Shared>, model: Arc<dyn Servable>) {
        let mut state = self.lock();
        state.members.push(Member { shared, model });
        state.pending = true;
    }

    /// A queue has something new: a request, or it closed. Taking the pool's lock orders
    /// this after any scan in progress, so the wake-up cannot be missed.
    pub(super) fn notify(&self, all: bool) {
        let mut state = self.lock();
        state.pending = true;
        self.hint.store(true, Ordering::Release);
        let sleeping = state.sleeping;
        drop(state);
        if sleeping == 0 {
            return;
        }
        if all {
            self.wake.notify_all();
        } else {
            self.wake.notify_one();
        }
    }

    fn stop(&self) {
        self.lock().stopping = true;
        // Unconditionally: a thread counts itself asleep only once it holds the lock.
        self.wake.notify_all();
    }
}

/// How long a thread that found nothing to do polls (yielding the CPU) before it sleeps,
/// at most once per wake-up. Measured on 2 cores, MNIST at 32 callers: +10-16%
/// requests/s and a lower p50 at 1 caller; an idle worker does not poll.
const POLL: Duration = Duration::from_micros(50);

fn pool_thread(signal: &Signal) {
    ON_POOL_THREAD.with(|f| f.set(true));
    let mut scratch = Scratch::default();
    let mut polled = Instant::now();
    let mut state = signal.lock();
    loop {
        state.pending = false;
        signal.hint.store(false, Ordering::Relaxed);
        let now = Instant::now();
        let n = state.members.len();
        let start = if n == 0 { 0 } else { state.next % n };
        let mut wake_at: Option<Instant> = None;
        let mut chosen = None;
        let mut finished = false;
        for k in 0..n {
            let i = (start + k) % n;
            match state.members[i].shared.try_take(&mut scratch, now) {
                Take::Batch { more } => {
                    chosen = Some((i, more));
                    break;
                }
                Take::Wait(at) => {
                    wake_at = match (wake_at, at) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                Take::Finished => finished = true,
            }
        }
        if let Some((i, more)) = chosen {
            state.next = i + 1;
            let member = &state.members[i];
            let (shared, model) = (Arc::clone(&member.shared), Arc::clone(&member.model));
            if more {
                // This thread takes one batch; let another one look at what is left.
                state.pending = true;
                if state.sleeping > 0 {
                    signal.wake.notify_one();
                }
            }
            drop(state);
            run::run_taken(&shared, &*model, &mut scratch.batch);
            shared.batch_done();
            drop((shared, model));
            state = signal.lock();
            continue;
        }
        if finished {
            detach_finished(&mut state);
        }
        if state.pending {
            continue;
        }
        if state.stopping && state.members.is_empty() {
            return;
        }
        if polled.elapsed() > POLL {
            // Poll a moment before sleeping: under load the next request is usually
            // microseconds away, and a sleep costs a futex wake and a context switch.
            drop(state);
            let until = Instant::now() + POLL;
            while Instant::now() < until && !signal.hint.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            polled = Instant::now();
            state = signal.lock();
            continue;
        }
        state.sleeping += 1;
        state = match wake_at {
            Some(t) => {
                let wait = t
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_micros(1));
                signal
                    .wake
                    .wait_timeout(state, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => signal
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner),
        };
        state.sleeping -= 1;
    }
}

/// Removes the queues that are closed, empty and idle, dropping their model before
/// telling their batcher, so a finished shutdown has released the model.
fn detach_finished(state: &mut PoolState) {
    let members = std::mem::take(&mut state.members);
    for member in members {
        if member.shared.is_finished() {
            let Member { shared, model } = member;
            drop(model);
            shared.mark_detached();
        } else {
            state.members.push(member);
        }
    }
}
