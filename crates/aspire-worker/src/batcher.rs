//! The batcher of one loaded model version: a bounded queue and dedicated batch threads.
//!
//! INTERFACE (filled in by the batcher work; the rest of the worker codes against it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aspire_core::Signature;

use crate::model::Servable;
use crate::tensor::HostTensor;

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
    /// Threads running forward passes for this version.
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
}

/// The queue and batch threads of one model version.
pub struct Batcher {
    _private: (),
}

impl Batcher {
    /// Starts `config.num_batch_threads` threads running `model`.
    pub fn new(_model: Arc<dyn Servable>, _config: BatchConfig) -> Self {
        unimplemented!("batcher")
    }

    /// Queues one request (inputs in the signature's order, each with the same rows) and
    /// waits for its outputs. Requests share a batch only when they are for the same
    /// signature and their inputs agree on every dimension but the first. A request whose
    /// `deadline` passes, or whose caller stops waiting (the future is dropped), while
    /// queued is removed before the forward pass.
    pub async fn submit(
        &self,
        _signature: Arc<Signature>,
        _inputs: Vec<HostTensor>,
        _deadline: Option<Instant>,
    ) -> Result<Vec<HostTensor>, BatchError> {
        unimplemented!("batcher")
    }

    /// Rows waiting in the queue.
    pub fn queued_rows(&self) -> usize {
        unimplemented!("batcher")
    }

    /// Stops taking requests, lets the queued ones finish, and joins the threads.
    pub fn shutdown(&self) {
        unimplemented!("batcher")
    }
}
