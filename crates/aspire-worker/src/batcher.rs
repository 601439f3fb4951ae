//! The batcher of one loaded model version: a bounded queue of requests, served by a
//! pool of dedicated OS threads (shared by every version of a worker, or the version's
//! own) that merge compatible requests into batches and run the forward passes.
//!
//! It owns TensorFlow Serving's batching semantics for a version: sizes count rows
//! (dimension 0); a batch thread takes the oldest request plus the queued requests that
//! can share its forward pass, up to `max_batch_size` rows, and runs at once
//! (`batch_timeout` zero) or when the batch is full or its oldest request has waited
//! `batch_timeout`. Requests whose deadline passed or whose caller left are answered or
//! dropped before they cost a forward pass. Inputs are concatenated (and padded to
//! `allowed_batch_sizes`) once per batch; outputs go back to callers as zero-copy slices.
//!
//! - `queue`: the queue, its capacity and the rule that gathers a batch;
//! - `pool`: the batch threads and how they pick among queues;
//! - `run`: one forward pass, and the poison isolation of a batch that fails;
//! - `passes`: the passes running now, to tell slow ones.

mod passes;
mod pool;
mod queue;
mod run;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aspire_core::Signature;
use aspire_telemetry::metrics::BatchMetrics;
use tokio::sync::oneshot;

use crate::model::Servable;
use crate::tensor::HostTensor;
pub use passes::{PassWatch, SlowPasses};
pub use pool::BatchPool;
use queue::{Item, Shared};

/// How a version's requests are batched (TF Serving's BatchingParameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    /// `--enable_batching`: when false each request runs alone (still on batch threads).
    pub enabled: bool,
    /// Most rows in one forward pass.
    pub max_batch_size: usize,
    /// How long the oldest queued request may wait for a fuller batch; zero runs whatever
    /// is queued as soon as a batch thread is free.
    pub batch_timeout: Duration,
    /// Queue capacity, in batches of `max_batch_size` rows.
    pub max_enqueued_batches: usize,
    /// Queue capacity in bytes of input tensors, whatever their rows.
    pub max_enqueued_bytes: usize,
    /// Batch threads: of the worker's shared pool, or of a batcher made with
    /// [`Batcher::new`], its own.
    pub num_batch_threads: usize,
    /// When non-empty, batches are padded to the next of these sizes (ascending; the
    /// last equals `max_batch_size`).
    pub allowed_batch_sizes: Vec<usize>,
}

/// Why a request did not get outputs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    /// The queue holds `max_enqueued_batches` batches already.
    #[error("the batch queue is full ({rows} rows queued, capacity {capacity}); retry later")]
    QueueFull {
        /// Rows queued.
        rows: usize,
        /// Capacity in rows.
        capacity: usize,
    },
    /// The queue's inputs would pass `max_enqueued_bytes` with this request's.
    #[error(
        "the batch queue of this version holds {queued} bytes of inputs; with this request's {bytes} it would pass its limit of {capacity} bytes (--max-enqueued-bytes); retry later"
    )]
    QueueBytesFull {
        /// Bytes queued.
        queued: usize,
        /// Bytes of this request's inputs.
        bytes: usize,
        /// `max_enqueued_bytes`.
        capacity: usize,
    },
    /// The request has more rows than one batch may hold.
    #[error("request has {rows} rows; the largest batch is {max} rows")]
    TooLarge {
        /// Rows in the request.
        rows: usize,
        /// `max_batch_size`.
        max: usize,
    },
    /// The deadline passed while queued; the request was not run.
    #[error("deadline exceeded while queued; the request was not run")]
    DeadlineExceeded,
    /// The model failed on the batch.
    #[error("inference failed: {0}")]
    Model(String),
    /// The version is unloading and takes no new requests.
    #[error("this version is unloading")]
    ShuttingDown,
    /// The version was dropped at its drain limit while the request was queued or
    /// running; the request may be retried (on another version or worker).
    #[error(
        "this version was unloaded while the request was queued or running (its requests did not finish within --unload-drain-seconds); retry"
    )]
    VersionDropped,
}

/// Counts since the batcher started, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Forward passes run (failed ones included).
    pub batches: u64,
    /// Requests that went into those forward passes.
    pub requests: u64,
    /// Rows of those requests: the sum of batch sizes, padding excluded.
    pub rows: u64,
    /// Zero rows added to reach an allowed batch size.
    pub padding_rows: u64,
    /// Forward passes that failed (model error, panic or bad outputs).
    pub failed_batches: u64,
    /// Requests answered `DeadlineExceeded` instead of being run.
    pub expired: u64,
    /// Requests whose caller left before they ran; they were not run.
    pub abandoned: u64,
}

/// The queue of one model version, and the pool that serves it.
pub struct Batcher {
    shared: Arc<Shared>,
    /// The batcher's own pool, when it was not given a shared one.
    own_pool: Option<BatchPool>,
}

impl Batcher {
    /// A batcher with its own pool of `config.num_batch_threads` threads running `model`.
    /// Counts of zero in `config` are taken as 1. Panics only if the OS cannot start a
    /// thread.
    pub fn new(model: Arc<dyn Servable>, config: BatchConfig) -> Self {
        Self::with_metrics(model, config, BatchMetrics::detached(), None)
    }

    /// A batcher recording queue depth, waits and batches in `metrics`, served by `pool`
    /// (shared with other batchers) or, without one, by a pool of its own.
    pub fn with_metrics(
        model: Arc<dyn Servable>,
        mut config: BatchConfig,
        metrics: BatchMetrics,
        pool: Option<&BatchPool>,
    ) -> Self {
        config.max_batch_size = config.max_batch_size.max(1);
        config.max_enqueued_batches = config.max_enqueued_batches.max(1);
        config.max_enqueued_bytes = config.max_enqueued_bytes.max(1);
        config.num_batch_threads = config.num_batch_threads.max(1);
        let mut own_pool = None;
        let pool = match pool {
            Some(pool) => pool,
            None => own_pool.insert(BatchPool::new(config.num_batch_threads)),
        };
        let signal = Arc::clone(pool.signal());
        let shared = Arc::new(Shared::new(config, metrics, Arc::clone(&signal)));
        signal.join(Arc::clone(&shared), model);
        Self { shared, own_pool }
    }

    /// Queues one request (inputs in the signature's order, each with the same rows) and
    /// waits for its outputs. Requests share a batch only when they are for the same
    /// signature and their inputs agree on every dimension but the first. A request whose
    /// `deadline` passes, or whose caller stops waiting (the future is dropped), while
    /// queued is removed before the forward pass.
    ///
    /// Rejections (`TooLarge`, `QueueFull`, `ShuttingDown`) come on the first poll. The
    /// deadline is checked by the batch threads, so while every one of them is busy in a
    /// long forward pass an expired request is answered when one comes free; a caller
    /// that must return at the deadline wraps this in a timeout (dropping the future
    /// unqueues the request). Inputs that contradict each other or the signature (which
    /// the codec rules out) are refused as `Model` errors, never run.
    pub async fn submit(
        &self,
        signature: Arc<Signature>,
        inputs: Vec<HostTensor>,
        deadline: Option<Instant>,
    ) -> Result<Vec<HostTensor>, BatchError> {
        let rows = check_inputs(&signature, &inputs).map_err(BatchError::Model)?;
        let config = &self.shared.config;
        // Also with batching off: `max_batch_size` then bounds one request's rows.
        if rows > config.max_batch_size {
            return Err(BatchError::TooLarge {
                rows,
                max: config.max_batch_size,
            });
        }
        let enqueued = Instant::now();
        if deadline.is_some_and(|d| d <= enqueued) {
            return Err(BatchError::DeadlineExceeded);
        }
        let (reply, outputs) = oneshot::channel();
        // Before the push: a drop that comes after it must be seen.
        let mut dropped = self.shared.dropped.subscribe();
        let bytes = inputs.iter().map(|t| t.data.len()).sum();
        self.shared.push(Item {
            signature,
            inputs,
            rows,
            bytes,
            deadline,
            enqueued,
            reply,
        })?;
        tokio::select! {
            biased;
            answer = outputs => answer.unwrap_or_else(|_| {
                Err(BatchError::Model(
                    "the batch thread stopped without answering".to_string(),
                ))
            }),
            _ = dropped.wait_for(|d| *d) => Err(BatchError::VersionDropped),
        }
    }

    /// Drops the version at its drain limit: takes no new requests, and answers every
    /// request still queued or in a forward pass with [`BatchError::VersionDropped`] at
    /// once. A pass in progress still runs to its end on its batch thread (LibTorch
    /// cannot be interrupted); the pool lets go of the model when it returns.
    pub fn abort(&self) {
        self.shared.dropped.send_replace(true);
        for item in self.shared.close(true) {
            let _ = item.reply.send(Err(BatchError::VersionDropped));
        }
    }

    /// The forward passes running now, shared with whoever watches for slow ones.
    pub fn passes(&self) -> Arc<PassWatch> {
        Arc::clone(&self.shared.passes)
    }

    /// Whether [`Self::abort`] dropped the version.
    pub fn is_dropped(&self) -> bool {
        *self.shared.dropped.borrow()
    }

    /// Forward passes running now.
    pub fn running_passes(&self) -> usize {
        self.shared.passes.running()
    }

    /// Rows waiting in the queue.
    pub fn queued_rows(&self) -> usize {
        self.shared.queued_rows()
    }

    /// Queue capacity in rows (`max_enqueued_batches * max_batch_size`).
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// The configuration in force (zero counts raised to 1).
    pub fn config(&self) -> &BatchConfig {
        &self.shared.config
    }

    /// Counters since start.
    pub fn stats(&self) -> BatchStats {
        self.shared.stats.snapshot()
    }

    /// Stops taking requests, lets the queued ones finish, and waits until the pool has
    /// let go of this queue and its model (and, for a batcher with its own pool, until
    /// its threads are gone). Blocks for as long as that takes (call it from
    /// `spawn_blocking` in async code); a second call, even a concurrent one, returns once
    /// that is done. Called from a batch thread (a model unloading its own version), it
    /// only closes the queue: waiting there would wait for itself.
    pub fn shutdown(&self) {
        self.shared.close(false);
        if pool::on_pool_thread() {
            return;
        }
        self.shared.wait_detached();
        if let Some(pool) = &self.own_pool {
            pool.stop_and_join();
        }
    }
}

impl Drop for Batcher {
    /// Answers whatever is queued with `ShuttingDown` (no caller can still be waiting:
    /// `submit` borrows the batcher) and lets the pool drop the queue (and its own
    /// threads exit) after the batch in hand, without waiting.
    fn drop(&mut self) {
        for item in self.shared.close(true) {
            let _ = item.reply.send(Err(BatchError::ShuttingDown));
        }
    }
}

/// Rows of a request whose inputs can be batched: one per signature input, none a
/// scalar, all with the same known rows and as many bytes as their shape says. The
/// batcher relies on this to concatenate and split without going out of bounds.
fn check_inputs(signature: &Signature, inputs: &[HostTensor]) -> Result<usize, String> {
    if inputs.len() != signature.inputs.len() {
        return Err(format!(
            "the request has {} inputs; the signature has {}",
            inputs.len(),
            signature.inputs.len()
        ));
    }
    let mut rows = None;
    for (t, spec) in inputs.iter().zip(&signature.inputs) {
        let name = &spec.name;
        if t.shape.is_empty() {
            return Err(format!(
                "input '{name}' is a scalar; it needs a batch dimension"
            ));
        }
        if t.shape.iter().any(|d| *d < 0) {
            return Err(format!(
                "input '{name}' has shape {:?}; sizes must be known",
                t.shape
            ));
        }
        let bytes = t.numel() * t.dtype.size();
        if t.data.len() != bytes {
            return Err(format!(
                "input '{name}' has {} bytes; shape {:?} of {} needs {bytes}",
                t.data.len(),
                t.shape,
                t.dtype
            ));
        }
        match rows {
            None => rows = Some((t.rows(), name)),
            Some((r, first)) if r != t.rows() => {
                return Err(format!(
                    "input '{name}' has {} rows but input '{first}' has {r}; every input needs the same rows",
                    t.rows()
                ));
            }
            Some(_) => {}
        }
    }
    Ok(rows.map_or(0, |(r, _)| r))
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Mutex, mpsc};

    use aspire_core::{DType, TensorSpec};
    use futures::FutureExt;

    use super::*;
    use crate::tensor::numel;

    type Reply = Result<Vec<HostTensor>, BatchError>;
    type Pending<'a> = Pin<Box<dyn Future<Output = Reply> + Send + 'a>>;

    /// Long enough never to fire on a loaded machine; only turns a hang into a failure.
    const GUARD: Duration = Duration::from_secs(20);

    /// What the fake model was given in one forward pass.
    #[derive(Debug, Clone, PartialEq)]
    struct Seen {
        method: String,
        rows: usize,
        inner: Vec<i64>,
        values: Vec<f32>,
    }

    /// Outputs `doubled` = 2 * the first input and `sum` = each row's sum over all
    /// inputs, so every caller's rows are checkable. A -1 in the first input panics, a
    /// -2 fails. The first forward pass can be held on a gate so tests pile up requests.
    #[derive(Default)]
    struct Fake {
        seen: Mutex<Vec<Seen>>,
        gate: Mutex<Option<(oneshot::Sender<()>, mpsc::Receiver<()>)>>,
        extra_output_rows: usize,
    }

    struct Gate {
        entered: Option<oneshot::Receiver<()>>,
        release: mpsc::Sender<()>,
    }

    impl Gate {
        /// Waits until the model holds the first forward pass.
        async fn entered(&mut self) {
            let entered = self.entered.take().expect("entered once");
            tokio::time::timeout(GUARD, entered)
                .await
                .expect("model never ran")
                .unwrap();
        }

        fn release(&self) {
            self.release.send(()).unwrap();
        }
    }

    impl Fake {
        fn gated() -> (Arc<Fake>, Gate) {
            let (entered_tx, entered) = oneshot::channel();
            let (release, release_rx) = mpsc::channel();
            let fake = Fake {
                gate: Mutex::new(Some((entered_tx, release_rx))),
                ..Fake::default()
            };
            (
                Arc::new(fake),
                Gate {
                    entered: Some(entered),
                    release,
                },
            )
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }

        fn batch_sizes(&self) -> Vec<usize> {
            self.seen().iter().map(|s| s.rows).collect()
        }
    }

    impl Servable for Fake {
        fn run(
            &self,
            signature: &Signature,
            inputs: &[HostTensor],
        ) -> Result<Vec<HostTensor>, String> {
            let x = inputs[0].to_f32().unwrap();
            let rows = inputs[0].rows();
            self.seen.lock().unwrap().push(Seen {
                method: signature.method.clone(),
                rows,
                inner: inputs[0].shape[1..].to_vec(),
                values: x.clone(),
            });
            let gate = self.gate.lock().unwrap().take();
            if let Some((entered, release)) = gate {
                entered.send(()).unwrap();
                release
                    .recv_timeout(GUARD)
                    .expect("test never released the gate");
            }
            if x.contains(&-1.0) {
                panic!("the fake model saw -1");
            }
            if x.contains(&-2.0) {
                return Err("the fake model refuses -2".to_string());
            }
            let mut sums = vec![0.0; rows];
            for input in inputs {
                let v = input.to_f32().unwrap();
                let width = v.len() / rows.max(1);
                for (r, sum) in sums.iter_mut().enumerate() {
                    *sum += v[r * width..(r + 1) * width].iter().sum::<f32>();
                }
            }
            let out_rows = rows + self.extra_output_rows;
            sums.resize(out_rows, 0.0);
            let mut doubled: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
            let mut shape = inputs[0].shape.clone();
            shape[0] = out_rows as i64;
            doubled.resize(numel(&shape), 0.0);
            Ok(vec![
                HostTensor::from_f32(shape, &doubled),
                HostTensor::from_f32(vec![out_rows as i64], &sums),
            ])
        }
    }

    fn spec(name: &str) -> TensorSpec {
        TensorSpec {
            name: name.to_string(),
            dtype: DType::F32,
            shape: Some(vec![-1, -1]),
        }
    }

    fn signature(method: &str, inputs: &[&str]) -> Arc<Signature> {
        Arc::new(Signature {
            method: method.to_string(),
            inputs: inputs.iter().map(|n| spec(n)).collect(),
            outputs: vec![
                spec("doubled"),
                TensorSpec {
                    shape: Some(vec![-1]),
                    ..spec("sum")
                },
            ],
        })
    }

    fn sig() -> Arc<Signature> {
        signature("forward", &["x"])
    }

    /// `rows` x `width` float32 values counting up from `base`.
    fn tensor(rows: usize, width: usize, base: f32) -> HostTensor {
        let values: Vec<f32> = (0..rows * width).map(|i| base + i as f32).collect();
        HostTensor::from_f32(vec![rows as i64, width as i64], &values)
    }

    fn config(max_batch_size: usize) -> BatchConfig {
        BatchConfig {
            enabled: true,
            max_batch_size,
            batch_timeout: Duration::ZERO,
            max_enqueued_batches: 4,
            max_enqueued_bytes: usize::MAX,
            num_batch_threads: 1,
            allowed_batch_sizes: Vec::new(),
        }
    }

    /// Submits and polls once, so the request is queued when this returns.
    async fn enqueue<'a>(
        b: &'a Batcher,
        signature: Arc<Signature>,
        inputs: Vec<HostTensor>,
        deadline: Option<Instant>,
    ) -> Pending<'a> {
        let mut pending: Pending<'a> = Box::pin(b.submit(signature, inputs, deadline));
        assert!(
            futures::poll!(&mut pending).is_pending(),
            "answered while the model was held"
        );
        pending
    }

    async fn finish(pending: Pending<'_>) -> Reply {
        tokio::time::timeout(GUARD, pending)
            .await
            .expect("request never answered")
    }

    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < GUARD, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn values(outputs: &[HostTensor]) -> Vec<Vec<f32>> {
        outputs.iter().map(|t| t.to_f32().unwrap()).collect()
    }

    /// Starts a batcher whose first forward pass (one row) is held on the gate.
    async fn held(config: BatchConfig) -> (Arc<Fake>, Gate, Arc<Batcher>) {
        let (fake, mut gate) = Fake::gated();
        let b = Arc::new(Batcher::new(fake.clone(), config));
        let blocker = b.clone();
        // A task, not a dropped future: the batcher does not run requests nobody awaits.
        tokio::spawn(async move { blocker.submit(sig(), vec![tensor(1, 2, 100.0)], None).await });
        gate.entered().await;
        (fake, gate, b)
    }

    #[test]
    fn submit_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let b = Batcher::new(Arc::new(Fake::default()), config(4));
        assert_send(&b.submit(sig(), vec![tensor(1, 2, 0.0)], None));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_one_batch_and_match_running_alone() {
        let sig2 = signature("forward", &["x", "y"]);
        let requests: Vec<Vec<HostTensor>> = [(1, 0.0), (3, 10.0), (2, 20.0)]
            .iter()
            .map(|&(rows, base)| vec![tensor(rows, 2, base), tensor(rows, 3, base + 0.5)])
            .collect();

        let alone = Fake::default();
        let mut expected = Vec::new();
        for inputs in &requests {
            expected.push(values(&alone.run(&sig2, inputs).unwrap()));
        }

        let (fake, gate, b) = held(config(8)).await;
        let mut pending = Vec::new();
        for inputs in &requests {
            pending.push(enqueue(&b, sig2.clone(), inputs.clone(), None).await);
        }
        assert_eq!(b.queued_rows(), 6);
        gate.release();
        for (p, want) in pending.into_iter().zip(expected) {
            assert_eq!(values(&finish(p).await.unwrap()), want);
        }
        assert_eq!(fake.batch_sizes(), vec![1, 6]);
        assert_eq!(b.queued_rows(), 0);
        let stats = b.stats();
        assert_eq!((stats.batches, stats.requests, stats.rows), (2, 4, 7));
    }

    #[tokio::test]
    async fn incompatible_shapes_and_signatures_are_not_mixed() {
        let (fake, gate, b) = held(config(8)).await;
        let other = signature("other", &["x"]);
        let a = enqueue(&b, sig(), vec![tensor(1, 2, 0.0)], None).await;
        let wide = enqueue(&b, sig(), vec![tensor(2, 3, 10.0)], None).await;
        let c = enqueue(&b, sig(), vec![tensor(1, 2, 20.0)], None).await;
        let d = enqueue(&b, other, vec![tensor(1, 2, 30.0)], None).await;
        gate.release();
        assert_eq!(values(&finish(a).await.unwrap())[0], vec![0.0, 2.0]);
        assert_eq!(
            values(&finish(wide).await.unwrap())[1],
            vec![10.0 + 11.0 + 12.0, 13.0 + 14.0 + 15.0]
        );
        assert_eq!(values(&finish(c).await.unwrap())[0], vec![40.0, 42.0]);
        assert_eq!(values(&finish(d).await.unwrap())[0], vec![60.0, 62.0]);
        let batches: Vec<(String, usize, Vec<i64>)> = fake
            .seen()
            .into_iter()
            .map(|s| (s.method, s.rows, s.inner))
            .collect();
        let forward = || "forward".to_string();
        assert_eq!(
            batches,
            vec![
                (forward(), 1, vec![2]),
                (forward(), 2, vec![2]), // a and c, over the wider request between them
                (forward(), 2, vec![3]),
                ("other".to_string(), 1, vec![2]),
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partial_batch_flushes_after_timeout() {
        let timeout = Duration::from_millis(50);
        let fake = Arc::new(Fake::default());
        let b = Batcher::new(
            fake.clone(),
            BatchConfig {
                batch_timeout: timeout,
                ..config(8)
            },
        );
        let start = Instant::now();
        let (one, two) = tokio::time::timeout(GUARD, async {
            tokio::join!(
                b.submit(sig(), vec![tensor(1, 2, 0.0)], None),
                b.submit(sig(), vec![tensor(2, 2, 5.0)], None),
            )
        })
        .await
        .expect("a partial batch was never flushed");
        assert!(start.elapsed() >= timeout, "ran before the batch timeout");
        assert_eq!(values(&one.unwrap())[1], vec![1.0]);
        assert_eq!(values(&two.unwrap())[1], vec![11.0, 15.0]);
        assert_eq!(fake.batch_sizes(), vec![3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_batch_does_not_wait_for_timeout() {
        let fake = Arc::new(Fake::default());
        let config = BatchConfig {
            batch_timeout: Duration::from_secs(3600),
            ..config(4)
        };
        let b = Batcher::new(fake.clone(), config);
        let (one, two) = tokio::time::timeout(GUARD, async {
            tokio::join!(
                b.submit(sig(), vec![tensor(1, 2, 0.0)], None),
                b.submit(sig(), vec![tensor(3, 2, 5.0)], None),
            )
        })
        .await
        .expect("a full batch waited for the timeout");
        assert!(one.is_ok() && two.is_ok());
        assert_eq!(fake.batch_sizes(), vec![4]);
    }

    #[tokio::test]
    async fn lone_request_runs_at_once_with_zero_timeout() {
        let fake = Arc::new(Fake::default());
        let b = Batcher::new(fake.clone(), config(8));
        let out = tokio::time::timeout(GUARD, b.submit(sig(), vec![tensor(1, 3, 1.0)], None))
            .await
            .expect("a lone request waited");
        assert_eq!(values(&out.unwrap()), vec![vec![2.0, 4.0, 6.0], vec![6.0]]);
        assert_eq!(fake.batch_sizes(), vec![1]);
    }

    #[tokio::test]
    async fn queue_full_is_rejected_at_once() {
        let config = BatchConfig {
            max_enqueued_batches: 2,
            max_enqueued_bytes: usize::MAX,
            ..config(2)
        };
        let (fake, gate, b) = held(config).await;
        assert_eq!(b.capacity(), 4);
        let a = enqueue(&b, sig(), vec![tensor(2, 2, 0.0)], None).await;
        let c = enqueue(&b, sig(), vec![tensor(1, 2, 0.0)], None).await;
        let d = enqueue(&b, sig(), vec![tensor(1, 2, 0.0)], None).await;
        let refused = b
            .submit(sig(), vec![tensor(1, 2, 0.0)], None)
            .now_or_never();
        assert_eq!(
            refused,
            Some(Err(BatchError::QueueFull {
                rows: 4,
                capacity: 4
            }))
        );
        gate.release();
        for p in [a, c, d] {
            assert!(finish(p).await.is_ok());
        }
        assert!(b.submit(sig(), vec![tensor(1, 2, 0.0)], None).await.is_ok());
        assert_eq!(fake.batch_sizes(), vec![1, 2, 2, 1]);
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_as_well_as_rows() {
        // Room for 400 rows, but only 64 bytes of inputs: 2 x 2 floats is 16 bytes.
        let config = BatchConfig {
            max_enqueued_batches: 100,
            max_enqueued_bytes: 64,
            ..config(4)
        };
        let (fake, gate, b) = held(config).await;
        // The batch thread is held; the queue fills up to 4 x 16 bytes.
        let queued = [
            enqueue(&b, sig(), vec![tensor(2, 2, 0.0)], None).await,
            enqueue(&b, sig(), vec![tensor(2, 2, 0.0)], None).await,
            enqueue(&b, sig(), vec![tensor(2, 2, 0.0)], None).await,
            enqueue(&b, sig(), vec![tensor(2, 2, 0.0)], None).await,
        ];
        let refused = b
            .submit(sig(), vec![tensor(1, 2, 0.0)], None)
            .now_or_never();
        assert_eq!(
            refused,
            Some(Err(BatchError::QueueBytesFull {
                queued: 64,
                bytes: 8,
                capacity: 64
            }))
        );
        let message = refused.unwrap().unwrap_err().to_string();
        assert!(message.contains("(--max-enqueued-bytes)"), "{message}");
        gate.release();
        for p in queued {
            assert!(finish(p).await.is_ok());
        }
        // Drained: the bytes were given back.
        assert!(b.submit(sig(), vec![tensor(1, 2, 0.0)], None).await.is_ok());
        assert_eq!(fake.batch_sizes(), vec![1, 4, 4, 1]);
    }

    #[tokio::test]
    async fn too_large_is_rejected_at_once() {
        let fake = Arc::new(Fake::default());
        let b = Batcher::new(fake.clone(), config(4));
        let refused = b
            .submit(sig(), vec![tensor(5, 2, 0.0)], None)
            .now_or_never();
        assert_eq!(refused, Some(Err(BatchError::TooLarge { rows: 5, max: 4 })));
        assert!(fake.seen().is_empty());
    }

    #[tokio::test]
    async fn malformed_inputs_are_refused_not_run() {
        let fake = Arc::new(Fake::default());
        let b = Batcher::new(fake.clone(), config(4));
        let two = signature("forward", &["x", "y"]);
        let cases = [
            (
                two.clone(),
                vec![tensor(2, 2, 0.0), tensor(3, 2, 0.0)],
                "input 'y' has 3 rows but input 'x' has 2",
            ),
            (
                two,
                vec![tensor(2, 2, 0.0)],
                "the request has 1 inputs; the signature has 2",
            ),
            (
                sig(),
                vec![HostTensor::from_f32(vec![], &[1.0])],
                "input 'x' is a scalar",
            ),
            (
                sig(),
                vec![HostTensor::from_f32(vec![2, 2], &[1.0])],
                "input 'x' has 4 bytes",
            ),
        ];
        for (signature, inputs, needle) in cases {
            match b.submit(signature, inputs, None).now_or_never() {
                Some(Err(BatchError::Model(msg))) => assert!(msg.contains(needle), "{msg}"),
                other => panic!("expected a refusal containing {needle:?}, got {other:?}"),
            }
        }
        assert!(fake.seen().is_empty());
    }

    #[tokio::test]
    async fn pads_to_next_allowed_size_and_drops_padding() {
        let fake = Arc::new(Fake::default());
        let config = BatchConfig {
            allowed_batch_sizes: vec![2, 4, 8],
            ..config(8)
        };
        let b = Batcher::new(fake.clone(), config);
        let out = b
            .submit(sig(), vec![tensor(3, 2, 1.0)], None)
            .await
            .unwrap();
        assert_eq!(out[0].shape, vec![3, 2]);
        assert_eq!(
            values(&out),
            vec![vec![2.0, 4.0, 6.0, 8.0, 10.0, 12.0], vec![3.0, 7.0, 11.0]]
        );
        let seen = fake.seen();
        assert_eq!(seen[0].rows, 4);
        assert_eq!(seen[0].values, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]);
        assert_eq!(b.stats().padding_rows, 1);
    }

    #[tokio::test]
    async fn expired_request_is_answered_and_not_run() {
        let (fake, gate, b) = held(config(8)).await;
        let late = b
            .submit(sig(), vec![tensor(1, 2, 0.0)], Some(Instant::now()))
            .now_or_never();
        assert_eq!(late, Some(Err(BatchError::DeadlineExceeded)));

        let deadline = Instant::now() + Duration::from_millis(30);
        let doomed = enqueue(&b, sig(), vec![tensor(2, 2, 0.0)], Some(deadline)).await;
        let fine = enqueue(&b, sig(), vec![tensor(1, 2, 7.0)], None).await;
        tokio::time::sleep_until((deadline + Duration::from_millis(1)).into()).await;
        gate.release();
        assert_eq!(finish(doomed).await, Err(BatchError::DeadlineExceeded));
        assert!(finish(fine).await.is_ok());
        assert_eq!(fake.batch_sizes(), vec![1, 1]);
        assert_eq!(b.stats().expired, 1);
    }

    #[tokio::test]
    async fn dropped_submit_is_not_run() {
        let (fake, gate, b) = held(config(8)).await;
        // Polled once (so queued), then dropped like a cancelled gRPC call.
        assert!(
            b.submit(sig(), vec![tensor(2, 2, 0.0)], None)
                .now_or_never()
                .is_none()
        );
        assert_eq!(b.queued_rows(), 2);
        let fine = enqueue(&b, sig(), vec![tensor(1, 2, 7.0)], None).await;
        gate.release();
        assert!(finish(fine).await.is_ok());
        assert_eq!(fake.batch_sizes(), vec![1, 1]);
        assert_eq!(b.queued_rows(), 0);
        assert_eq!(b.stats().abandoned, 1);
    }

    #[tokio::test]
    async fn panicking_model_answers_model_error_and_thread_survives() {
        let b = Batcher::new(Arc::new(Fake::default()), config(8));
        match b.submit(sig(), vec![tensor(1, 2, -1.0)], None).await {
            Err(BatchError::Model(msg)) => assert!(msg.contains("panicked"), "{msg}"),
            other => panic!("expected a model error, got {other:?}"),
        }
        let out = tokio::time::timeout(GUARD, b.submit(sig(), vec![tensor(1, 2, 1.0)], None));
        assert!(out.await.expect("the batch thread died").is_ok());
    }

    #[tokio::test]
    async fn a_failing_batch_runs_again_one_by_one_and_only_the_culprit_fails() {
        let (fake, gate, b) = held(config(8)).await;
        let a = enqueue(&b, sig(), vec![tensor(1, 2, 5.0)], None).await;
        let bad = enqueue(
            &b,
            sig(),
            vec![HostTensor::from_f32(vec![1, 2], &[-2.0, 0.0])],
            None,
        )
        .await;
        let c = enqueue(&b, sig(), vec![tensor(2, 2, 7.0)], None).await;
        gate.release();
        assert_eq!(values(&finish(a).await.unwrap())[0], vec![10.0, 12.0]);
        assert_eq!(
            finish(bad).await,
            Err(BatchError::Model("the fake model refuses -2".to_string()))
        );
        assert_eq!(
            values(&finish(c).await.unwrap())[0],
            vec![14.0, 16.0, 18.0, 20.0]
        );
        // The held pass, the shared pass of three that failed, then each alone (once).
        assert_eq!(fake.batch_sizes(), vec![1, 4, 1, 1, 2]);
        assert_eq!(b.stats().failed_batches, 2);
    }

    #[tokio::test]
    async fn a_panicking_request_in_a_batch_does_not_fail_the_others() {
        let (_fake, gate, b) = held(config(8)).await;
        let good = enqueue(&b, sig(), vec![tensor(1, 2, 1.0)], None).await;
        let bad = enqueue(
            &b,
            sig(),
            vec![HostTensor::from_f32(vec![1, 2], &[-1.0, 0.0])],
            None,
        )
        .await;
        gate.release();
        assert_eq!(values(&finish(good).await.unwrap())[0], vec![2.0, 4.0]);
        match finish(bad).await {
            Err(BatchError::Model(msg)) => assert!(msg.contains("saw -1"), "{msg}"),
            other => panic!("expected the model's panic, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn abort_answers_queued_and_running_requests_at_once() {
        let (_fake, gate, b) = held(config(1)).await;
        let queued = enqueue(&b, sig(), vec![tensor(1, 2, 5.0)], None).await;
        // The blocker's pass is still held: abort must not wait for it.
        b.abort();
        assert!(b.is_dropped());
        assert_eq!(finish(queued).await, Err(BatchError::VersionDropped));
        assert_eq!(
            b.submit(sig(), vec![tensor(1, 2, 5.0)], None).await,
            Err(BatchError::ShuttingDown)
        );
        assert_eq!(b.running_passes(), 1);
        gate.release();
        eventually("the held pass returns", || b.running_passes() == 0).await;
    }

    #[tokio::test]
    async fn abort_answers_a_caller_whose_pass_is_running() {
        let (fake, mut gate) = Fake::gated();
        let b = Arc::new(Batcher::new(fake, config(1)));
        let caller = b.clone();
        let running =
            tokio::spawn(async move { caller.submit(sig(), vec![tensor(1, 2, 1.0)], None).await });
        gate.entered().await;
        b.abort();
        let answer = tokio::time::timeout(GUARD, running).await.unwrap().unwrap();
        assert_eq!(answer, Err(BatchError::VersionDropped));
        gate.release();
    }

    #[tokio::test]
    async fn outputs_with_wrong_rows_are_an_error() {
        let fake = Fake {
            extra_output_rows: 1,
            ..Fake::default()
        };
        let config = BatchConfig {
            allowed_batch_sizes: vec![8],
            ..config(8)
        };
        let b = Batcher::new(Arc::new(fake), config);
        let err = b
            .submit(sig(), vec![tensor(3, 2, 0.0)], None)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            BatchError::Model("output 'doubled' has 9 rows for a batch of 8".to_string())
        );
    }

    #[tokio::test]
    async fn disabled_batching_runs_each_request_alone() {
        let config = BatchConfig {
            enabled: false,
            ..config(4)
        };
        let (fake, gate, b) = held(config).await;
        let a = enqueue(&b, sig(), vec![tensor(1, 2, 0.0)], None).await;
        let c = enqueue(&b, sig(), vec![tensor(1, 2, 0.0)], None).await;
        let big = enqueue(&b, sig(), vec![tensor(3, 2, 0.0)], None).await;
        // `max_batch_size` still bounds one request.
        let refused = b
            .submit(sig(), vec![tensor(5, 2, 0.0)], None)
            .now_or_never();
        assert_eq!(refused, Some(Err(BatchError::TooLarge { rows: 5, max: 4 })));
        gate.release();
        for p in [a, c, big] {
            assert!(finish(p).await.is_ok());
        }
        assert_eq!(fake.batch_sizes(), vec![1, 1, 1, 3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_finishes_queued_rejects_new_and_is_idempotent() {
        let (fake, gate, b) = held(config(8)).await;
        let queued = enqueue(&b, sig(), vec![tensor(2, 2, 0.0)], None).await;
        let closing = tokio::task::spawn_blocking({
            let b = b.clone();
            move || b.shutdown()
        });
        eventually("submit refused while shutting down", || {
            b.submit(sig(), vec![tensor(1, 2, 0.0)], None)
                .now_or_never()
                == Some(Err(BatchError::ShuttingDown))
        })
        .await;
        gate.release();
        assert!(finish(queued).await.is_ok());
        tokio::time::timeout(GUARD, closing)
            .await
            .expect("shutdown hung")
            .unwrap();
        b.shutdown();
        assert_eq!(
            Arc::strong_count(&fake),
            1,
            "batch threads still hold the model"
        );
    }

    #[tokio::test]
    async fn drop_stops_the_threads() {
        let fake = Arc::new(Fake::default());
        let b = Batcher::new(
            fake.clone(),
            BatchConfig {
                num_batch_threads: 3,
                ..config(8)
            },
        );
        assert!(b.submit(sig(), vec![tensor(1, 2, 0.0)], None).await.is_ok());
        drop(b);
        eventually("threads exit", || Arc::strong_count(&fake) == 1).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_requests_on_two_threads_get_their_own_rows() {
        let fake = Arc::new(Fake::default());
        let config = BatchConfig {
            num_batch_threads: 2,
            batch_timeout: Duration::from_millis(1),
            max_enqueued_batches: 100,
            max_enqueued_bytes: usize::MAX,
            ..config(8)
        };
        let b = Arc::new(Batcher::new(fake.clone(), config));
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move {
                    let rows = 1 + i % 4;
                    let input = tensor(rows, 3, (i * 100) as f32);
                    let want = Fake::default()
                        .run(&sig(), std::slice::from_ref(&input))
                        .unwrap();
                    let got = b.submit(sig(), vec![input], None).await.unwrap();
                    assert_eq!(got, want, "request {i}");
                    rows
                })
            })
            .collect();
        let mut rows = 0;
        for task in tasks {
            rows += tokio::time::timeout(GUARD, task).await.unwrap().unwrap();
        }
        assert_eq!(fake.batch_sizes().iter().sum::<usize>(), rows);
        assert!(fake.batch_sizes().iter().all(|&n| n <= 8));
        assert_eq!(b.stats().rows, rows as u64);
    }

    /// Records which threads ran it.
    #[derive(Default)]
    struct ThreadSpy {
        inner: Fake,
        threads: Mutex<std::collections::HashSet<std::thread::ThreadId>>,
    }

    impl Servable for ThreadSpy {
        fn run(
            &self,
            signature: &Signature,
            inputs: &[HostTensor],
        ) -> Result<Vec<HostTensor>, String> {
            self.threads
                .lock()
                .unwrap()
                .insert(std::thread::current().id());
            self.inner.run(signature, inputs)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn versions_share_the_pool_threads_and_leave_it_one_by_one() {
        let pool = BatchPool::new(2);
        let (a, b) = (
            Arc::new(ThreadSpy::default()),
            Arc::new(ThreadSpy::default()),
        );
        let roomy = || BatchConfig {
            max_enqueued_batches: 100,
            max_enqueued_bytes: usize::MAX,
            ..config(4)
        };
        let join = |model: Arc<ThreadSpy>| {
            Arc::new(Batcher::with_metrics(
                model,
                roomy(),
                BatchMetrics::detached(),
                Some(&pool),
            ))
        };
        let (first, second) = (join(a.clone()), join(b.clone()));
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let batcher = if i % 2 == 0 {
                    first.clone()
                } else {
                    second.clone()
                };
                tokio::spawn(async move {
                    let input = tensor(1, 2, i as f32);
                    let got = batcher
                        .submit(sig(), vec![input.clone()], None)
                        .await
                        .unwrap();
                    let want = Fake::default().run(&sig(), &[input]).unwrap();
                    assert_eq!(got, want, "request {i}");
                })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(GUARD, task).await.unwrap().unwrap();
        }
        let mut threads = a.threads.lock().unwrap().clone();
        threads.extend(b.threads.lock().unwrap().iter().copied());
        assert!(
            (1..=2).contains(&threads.len()),
            "two versions on a pool of 2 ran on {} threads",
            threads.len()
        );
        // The first version leaves; the pool drops its model and keeps serving the other.
        tokio::task::spawn_blocking({
            let first = first.clone();
            move || first.shutdown()
        })
        .await
        .unwrap();
        assert_eq!(
            Arc::strong_count(&a),
            1,
            "the pool still holds the first model"
        );
        assert_eq!(
            first.submit(sig(), vec![tensor(1, 2, 0.0)], None).await,
            Err(BatchError::ShuttingDown)
        );
        assert!(
            second
                .submit(sig(), vec![tensor(1, 2, 0.0)], None)
                .await
                .is_ok()
        );
        assert_eq!(pool.threads(), 2);
    }
}
