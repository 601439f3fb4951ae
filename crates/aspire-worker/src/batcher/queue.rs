//! The bounded queue shared by a version's callers and the batch threads, and the rule
//! that picks which queued requests form the next batch.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use aspire_core::Signature;
use aspire_telemetry::metrics::BatchMetrics;
use tokio::sync::{oneshot, watch};

use super::passes::PassWatch;
use super::pool::Signal;
use super::{BatchConfig, BatchError, BatchStats};
use crate::tensor::HostTensor;

/// What a caller gets back.
pub(super) type Reply = Result<Vec<HostTensor>, BatchError>;

/// One queued request.
pub(super) struct Item {
    pub signature: Arc<Signature>,
    pub inputs: Vec<HostTensor>,
    pub rows: usize,
    /// Bytes of its inputs.
    pub bytes: usize,
    pub deadline: Option<Instant>,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Reply>,
}

impl Item {
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }

    /// The submit future was dropped (e.g. the client cancelled), so nobody would read
    /// the outputs.
    pub fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn dead(&self, now: Instant) -> bool {
        self.expired(now) || self.abandoned()
    }

    /// Whether `other` may share a forward pass with `self`: same signature, and every
    /// input of the same dtype and the same dimensions past the first.
    fn batches_with(&self, other: &Item) -> bool {
        (Arc::ptr_eq(&self.signature, &other.signature) || self.signature == other.signature)
            && self.inputs.len() == other.inputs.len()
            && self.inputs.iter().zip(&other.inputs).all(|(a, b)| {
                a.dtype == b.dtype && a.shape.len() == b.shape.len() && a.shape[1..] == b.shape[1..]
            })
    }
}

/// A batch thread's buffers, reused from batch to batch so that gathering allocates
/// nothing per request.
#[derive(Default)]
pub(super) struct Scratch {
    /// The items of the next forward pass, oldest first.
    pub batch: Vec<Item>,
    /// Items whose deadline passed; they are answered once the lock is released.
    pub expired: Vec<Item>,
    /// Items nobody waits for; dropped once the lock is released.
    pub abandoned: Vec<Item>,
    /// Items skipped while gathering, to be put back in their places.
    kept: Vec<Item>,
}

/// Counters behind [`BatchStats`].
#[derive(Default)]
pub(super) struct Counters {
    pub batches: AtomicU64,
    pub requests: AtomicU64,
    pub rows: AtomicU64,
    pub padding_rows: AtomicU64,
    pub failed_batches: AtomicU64,
    pub expired: AtomicU64,
    pub abandoned: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BatchStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BatchStats {
            batches: get(&self.batches),
            requests: get(&self.requests),
            rows: get(&self.rows),
            padding_rows: get(&self.padding_rows),
            failed_batches: get(&self.failed_batches),
            expired: get(&self.expired),
            abandoned: get(&self.abandoned),
        }
    }
}

struct State {
    queue: VecDeque<Item>,
    /// Rows of every item in `queue`.
    rows: usize,
    /// Input bytes of every item in `queue`.
    bytes: usize,
    /// No new items; the batch threads drain the queue, then the pool lets it go.
    closed: bool,
    /// Batches taken from this queue and not yet answered.
    running: usize,
    /// The pool has let go of this queue (and of its model).
    detached: bool,
    /// Where `rows` is published (under the lock, so the gauge never goes back in time).
    metrics: BatchMetrics,
}

/// The queue, its wake-up signal, and what the batch threads need to know.
pub(super) struct Shared {
    /// Normalised: every count is at least 1.
    pub config: BatchConfig,
    /// Most rows queued at once.
    pub capacity: usize,
    pub stats: Counters,
    /// Waits and batches; the queue depth is published through `state`.
    pub metrics: BatchMetrics,
    /// The forward passes running now, to tell slow ones.
    pub passes: Arc<PassWatch>,
    /// Set when the version is dropped at its drain limit: every caller still waiting
    /// (queued or in a pass) is answered at once.
    pub dropped: watch::Sender<bool>,
    state: Mutex<State>,
    /// The pool this queue belongs to, told of every arrival and of the close.
    signal: Arc<Signal>,
    /// Signalled when the pool lets go of this queue.
    detached: Condvar,
}

/// What a batch thread found in a queue.
pub(super) enum Take {
    /// A batch is in the scratch's `batch`; `more` when the queue still holds items.
    Batch { more: bool },
    /// Nothing due; look again at this time (a batch timeout or a deadline), or when
    /// signalled (`None`).
    Wait(Option<Instant>),
    /// Closed, empty and idle: the pool may let it go.
    Finished,
}

/// The batch the oldest item would start if it ran now.
struct Plan {
    /// Items `0..end` of the queue hold the batch (and maybe skipped items between).
    end: usize,
    /// No more rows could join: `max_batch_size` reached or the next compatible item
    /// does not fit.
    full: bool,
}

impl Shared {
    pub fn new(config: BatchConfig, metrics: BatchMetrics, signal: Arc<Signal>) -> Self {
        let capacity = config
            .max_enqueued_batches
            .saturating_mul(config.max_batch_size);
        Self {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(capacity.min(1024)),
                rows: 0,
                bytes: 0,
                closed: false,
                running: 0,
                detached: false,
                metrics: metrics.clone(),
            }),
            metrics,
            passes: Arc::default(),
            dropped: watch::channel(false).0,
            signal,
            detached: Condvar::new(),
            stats: Counters::default(),
            capacity,
            config,
        }
    }

    // A panic is never raised with the lock held, but if one were, the queue is still
    // consistent item by item, so serving on beats wedging every caller.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item`, or says why not.
    pub fn push(&self, item: Item) -> Result<(), BatchError> {
        let mut state = self.lock();
        if state.closed {
            return Err(BatchError::ShuttingDown);
        }
        if state.rows + item.rows > self.capacity {
            return Err(BatchError::QueueFull {
                rows: state.rows,
                capacity: self.capacity,
            });
        }
        // A lone request always fits, so that a limit below one request never wedges.
        if state.bytes > 0 && state.bytes + item.bytes > self.config.max_enqueued_bytes {
            return Err(BatchError::QueueBytesFull {
                queued: state.bytes,
                bytes: item.bytes,
                capacity: self.config.max_enqueued_bytes,
            });
        }
        state.rows += item.rows;
        state.bytes += item.bytes;
        state.metrics.set_queue_rows(state.rows);
        state.queue.push_back(item);
        drop(state);
        self.signal.notify(false);
        Ok(())
    }

    pub fn queued_rows(&self) -> usize {
        self.lock().rows
    }

    /// Refuses new items from now on. With `discard`, also empties the queue and returns
    /// what was in it; without, the batch threads run what is queued before exiting.
    pub fn close(&self, discard: bool) -> Vec<Item> {
        let mut state = self.lock();
        state.closed = true;
        let discarded = if discard {
            state.rows = 0;
            state.bytes = 0;
            state.metrics.set_queue_rows(0);
            state.queue.drain(..).collect()
        } else {
            Vec::new()
        };
        drop(state);
        self.signal.notify(true);
        discarded
    }

    /// Moves the batch that is due, if one is, into `s.batch`. Dead items met on the way
    /// are answered (expired) or dropped (abandoned) here. Never blocks on anything but
    /// this queue's lock.
    pub fn try_take(&self, s: &mut Scratch, now: Instant) -> Take {
        let mut state = self.lock();
        state.purge_front(now, s);
        let take = match state.queue.front() {
            None if state.closed && state.running == 0 => Take::Finished,
            None => Take::Wait(None),
            Some(head) => {
                let timeout = self.config.batch_timeout;
                let plan = state.plan(&self.config, now);
                // `None` when the timeout is too large to add: only a full batch runs it.
                let flush_at = head.enqueued.checked_add(timeout);
                let due = plan.full
                    || state.closed
                    || timeout.is_zero()
                    || flush_at.is_some_and(|t| t <= now);
                if due {
                    state.take(plan.end, self.config.max_batch_size, now, s);
                    state.running += 1;
                    Take::Batch {
                        more: !state.queue.is_empty(),
                    }
                } else {
                    // Also wake for the head's deadline, so it is answered on time.
                    Take::Wait(match (flush_at, head.deadline) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    })
                }
            }
        };
        drop(state);
        self.settle_dead(s);
        take
    }

    /// Answers the expired items gathered in `s` and drops the abandoned ones.
    fn settle_dead(&self, s: &mut Scratch) {
        Counters::add(&self.stats.expired, s.expired.len());
        Counters::add(&self.stats.abandoned, s.abandoned.len());
        for item in s.expired.drain(..) {
            // The caller may have gone meanwhile; nobody to tell then.
            let _ = item.reply.send(Err(BatchError::DeadlineExceeded));
        }
        s.abandoned.clear();
    }

    /// A batch taken by [`Self::try_take`] has been answered.
    pub fn batch_done(&self) {
        self.lock().running -= 1;
    }

    /// Closed, empty and with no batch running.
    pub fn is_finished(&self) -> bool {
        let state = self.lock();
        state.closed && state.queue.is_empty() && state.running == 0
    }

    /// Called by the pool once it has dropped this queue and its model.
    pub fn mark_detached(&self) {
        self.lock().detached = true;
        self.detached.notify_all();
    }

    /// Blocks until the pool has let go of this (closed) queue.
    pub fn wait_detached(&self) {
        let mut state = self.lock();
        while !state.detached {
            state = self
                .detached
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl State {
    fn remove_rows(&mut self, item: &Item) {
        self.rows -= item.rows;
        self.bytes -= item.bytes;
        self.metrics.set_queue_rows(self.rows);
    }

    fn purge_front(&mut self, now: Instant, s: &mut Scratch) {
        while let Some(item) = self.queue.front() {
            if !item.dead(now) {
                break;
            }
            if let Some(item) = self.queue.pop_front() {
                self.remove_rows(&item);
                discard(item, now, s);
            }
        }
    }

    /// Reads which items the oldest (live) item would batch with, without moving any.
    fn plan(&self, config: &BatchConfig, now: Instant) -> Plan {
        let max = config.max_batch_size;
        let head = &self.queue[0];
        let mut plan = Plan {
            end: 1,
            full: !config.enabled || head.rows >= max,
        };
        let mut rows = head.rows;
        if plan.full {
            return plan;
        }
        for (i, item) in self.queue.iter().enumerate().skip(1) {
            if item.dead(now) || !head.batches_with(item) {
                continue;
            }
            // Stop at the first compatible item that does not fit rather than let
            // smaller later ones overtake it: big requests must not starve.
            if rows + item.rows > max {
                plan.full = true;
                break;
            }
            rows += item.rows;
            plan.end = i + 1;
            if rows == max {
                plan.full = true;
                break;
            }
        }
        plan
    }

    /// Moves the batch out of `queue[..end]`, putting skipped items back in order. It
    /// re-applies `plan`'s rule because a caller may have gone away since.
    fn take(&mut self, end: usize, max: usize, now: Instant, s: &mut Scratch) {
        let mut rows = 0;
        let mut stopped = false;
        for _ in 0..end {
            let Some(item) = self.queue.pop_front() else {
                break;
            };
            if item.dead(now) {
                self.remove_rows(&item);
                discard(item, now, s);
                continue;
            }
            let compatible = s.batch.first().is_none_or(|head| head.batches_with(&item));
            if compatible && !stopped && (s.batch.is_empty() || rows + item.rows <= max) {
                rows += item.rows;
                self.remove_rows(&item);
                s.batch.push(item);
            } else {
                stopped |= compatible;
                s.kept.push(item);
            }
        }
        while let Some(item) = s.kept.pop() {
            self.queue.push_front(item);
        }
    }
}

fn discard(item: Item, now: Instant, s: &mut Scratch) {
    if item.expired(now) {
        s.expired.push(item);
    } else {
        s.abandoned.push(item);
    }
}
