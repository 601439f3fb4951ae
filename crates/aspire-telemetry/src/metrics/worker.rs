//! The worker's metrics, `aspire_worker_*` (also what `aspire-server` exports, since it
//! runs a worker):
//!
//! | metric | type | labels | what |
//! | --- | --- | --- | --- |
//! | `aspire_worker_requests_total` | counter | model, version, code | Predict calls by gRPC code |
//! | `aspire_worker_request_duration_seconds` | histogram | model, version | a Predict call in the service, start to answer |
//! | `aspire_worker_queue_wait_seconds` | histogram | model, version | a request's wait from its enqueue to the start of its batch |
//! | `aspire_worker_forward_pass_seconds` | histogram | model, version | one batch: assembling its inputs and running the model |
//! | `aspire_worker_batch_rows` | histogram | model, version | rows of a batch, padding excluded |
//! | `aspire_worker_batch_padding_rows_total` | counter | model, version | zero rows added to reach an allowed batch size |
//! | `aspire_worker_queue_rows` | gauge | model, version | rows waiting in the version's queue |
//! | `aspire_worker_version_load_duration_seconds` | histogram | model | a successful load: fetch, load, warm-up |
//! | `aspire_worker_version_load_failures_total` | counter | model | loads that failed (each retry counts) |
//! | `aspire_worker_versions_available` | gauge | model | versions AVAILABLE on this worker |
//! | `aspire_worker_slow_passes_total` | counter | model, version | forward passes that ran past `--slow-pass-seconds` (counted as they cross it) |
//! | `aspire_worker_slow_passes_running` | gauge | model, version | forward passes running past `--slow-pass-seconds` now |
//!
//! A Predict that names a model this worker does not serve, or a version it has not
//! loaded, or that is malformed before its version is known, is counted with empty
//! `model` and `version`: labels only ever hold what the worker serves, so a client
//! cannot grow the number of series.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::{LATENCY_BUCKETS, RequestMetrics};

/// Rows per batch: powers of two up to 1024, the usual `max_batch_size` choices.
const ROW_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Load times, in seconds: 50 ms to 10 min (fetching from cloud storage and warming up
/// a large model on a GPU takes minutes).
const LOAD_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

const MODEL_VERSION: &[&str] = &["model", "version"];

/// One worker's metrics and the registry that holds them. Cloning shares them.
#[derive(Clone)]
pub struct WorkerMetrics(Arc<Inner>);

struct Inner {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    queue_wait: HistogramVec,
    forward_pass: HistogramVec,
    batch_rows: HistogramVec,
    padding_rows: IntCounterVec,
    queue_rows: IntGaugeVec,
    load_duration: HistogramVec,
    load_failures: IntCounterVec,
    versions_available: IntGaugeVec,
    slow_passes: IntCounterVec,
    slow_passes_running: IntGaugeVec,
    /// Requests that never reached a loaded version.
    unresolved: RequestMetrics,
    /// The models `versions_available` has a series for, to drop those that left.
    available_models: Mutex<Vec<String>>,
}

impl WorkerMetrics {
    /// A new registry holding every worker metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique name");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique name");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid histogram");
            registry.register(Box::new(h.clone())).expect("unique name");
            h
        };
        let requests = counter(
            "aspire_worker_requests_total",
            "Predict requests by model, version and gRPC code (empty model and version: the request reached no loaded version).",
            &["model", "version", "code"],
        );
        let request_duration = histogram(
            "aspire_worker_request_duration_seconds",
            "Time a Predict request spent in the worker's service, from its start to its answer.",
            MODEL_VERSION,
            LATENCY_BUCKETS,
        );
        let unresolved = RequestMetrics::new(&requests, &request_duration, "", "");
        Self(Arc::new(Inner {
            requests,
            request_duration,
            unresolved,
            queue_wait: histogram(
                "aspire_worker_queue_wait_seconds",
                "Time a request waited in its version's queue, from enqueue to the start of its batch.",
                MODEL_VERSION,
                LATENCY_BUCKETS,
            ),
            forward_pass: histogram(
                "aspire_worker_forward_pass_seconds",
                "Time one batch took: assembling its inputs and running the model.",
                MODEL_VERSION,
                LATENCY_BUCKETS,
            ),
            batch_rows: histogram(
                "aspire_worker_batch_rows",
                "Rows in one batch (forward pass), padding excluded.",
                MODEL_VERSION,
                ROW_BUCKETS,
            ),
            padding_rows: counter(
                "aspire_worker_batch_padding_rows_total",
                "Zero rows added to batches to reach an allowed batch size.",
                MODEL_VERSION,
            ),
            queue_rows: gauge(
                "aspire_worker_queue_rows",
                "Rows waiting in the version's batch queue.",
                MODEL_VERSION,
            ),
            load_duration: histogram(
                "aspire_worker_version_load_duration_seconds",
                "Time a successful version load took: fetching from storage, loading into LibTorch and warming up.",
                &["model"],
                LOAD_BUCKETS,
            ),
            load_failures: counter(
                "aspire_worker_version_load_failures_total",
                "Version loads that failed (each retry counts).",
                &["model"],
            ),
            versions_available: gauge(
                "aspire_worker_versions_available",
                "Versions of the model AVAILABLE on this worker.",
                &["model"],
            ),
            slow_passes: counter(
                "aspire_worker_slow_passes_total",
                "Forward passes that ran past --slow-pass-seconds, counted when they cross it.",
                MODEL_VERSION,
            ),
            slow_passes_running: gauge(
                "aspire_worker_slow_passes_running",
                "Forward passes running past --slow-pass-seconds now.",
                MODEL_VERSION,
            ),
            available_models: Mutex::new(Vec::new()),
            registry,
        }))
    }

    /// The registry to serve.
    pub fn registry(&self) -> &Registry {
        &self.0.registry
    }

    /// The handles of one model version, resolved once (call it when the version loads).
    pub fn version(&self, model: &str, version: &str) -> VersionMetrics {
        let i = &self.0;
        let labels = [model, version];
        VersionMetrics {
            requests: RequestMetrics::new(&i.requests, &i.request_duration, model, version)
                .init_ok(),
            batch: BatchMetrics {
                queue_wait: i.queue_wait.with_label_values(&labels),
                forward_pass: i.forward_pass.with_label_values(&labels),
                batch_rows: i.batch_rows.with_label_values(&labels),
                padding_rows: i.padding_rows.with_label_values(&labels),
                queue_rows: i.queue_rows.with_label_values(&labels),
            },
        }
    }

    /// Where requests that reached no loaded version are counted.
    pub fn unresolved(&self) -> &RequestMetrics {
        &self.0.unresolved
    }

    /// Records a successful load of a version of `model`.
    pub fn version_loaded(&self, model: &str, took: Duration) {
        self.0
            .load_duration
            .with_label_values(&[model])
            .observe(took.as_secs_f64());
    }

    /// Records a version's slow forward passes: `new` that crossed the threshold since
    /// the last call, and `running` past it now.
    pub fn slow_passes(&self, model: &str, version: &str, new: u64, running: u64) {
        let labels = [model, version];
        self.0.slow_passes.with_label_values(&labels).inc_by(new);
        self.0
            .slow_passes_running
            .with_label_values(&labels)
            .set(i64::try_from(running).unwrap_or(i64::MAX));
    }

    /// Counts a failed load of a version of `model`.
    pub fn version_load_failed(&self, model: &str) {
        self.0.load_failures.with_label_values(&[model]).inc();
    }

    /// Sets how many versions of each model are AVAILABLE; models not listed any more
    /// lose their series.
    pub fn set_versions_available<'a>(&self, counts: impl IntoIterator<Item = (&'a str, usize)>) {
        let gauge = &self.0.versions_available;
        let mut known = self
            .0
            .available_models
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut now = Vec::with_capacity(known.len());
        for (model, n) in counts {
            gauge
                .with_label_values(&[model])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
            now.push(model.to_string());
        }
        for gone in known.iter().filter(|m| !now.contains(m)) {
            let _ = gauge.remove_label_values(&[gone.as_str()]);
        }
        *known = now;
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

/// The handles of one loaded model version.
#[derive(Debug)]
pub struct VersionMetrics {
    /// Its Predict requests, recorded by the service.
    pub requests: RequestMetrics,
    /// Its queue and batches, recorded by its batcher.
    pub batch: BatchMetrics,
}

impl VersionMetrics {
    /// Handles registered nowhere: for a version outside a worker (tests, benchmarks).
    pub fn detached() -> Self {
        WorkerMetrics::new().version("", "")
    }
}

/// What a version's batcher records: queue depth, waits, batches.
#[derive(Clone)]
pub struct BatchMetrics {
    queue_wait: Histogram,
    forward_pass: Histogram,
    batch_rows: Histogram,
    padding_rows: IntCounter,
    queue_rows: IntGauge,
}

impl BatchMetrics {
    /// Handles registered nowhere: for a batcher outside a worker (tests, benchmarks).
    pub fn detached() -> Self {
        VersionMetrics::detached().batch
    }

    /// The queue now holds `rows` rows.
    pub fn set_queue_rows(&self, rows: usize) {
        self.queue_rows.set(i64::try_from(rows).unwrap_or(i64::MAX));
    }

    /// A request starts its batch after waiting `waited` in the queue.
    pub fn observe_queue_wait(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// A batch of `rows` rows plus `padding_rows` padding ran in `took`.
    pub fn observe_batch(&self, took: Duration, rows: usize, padding_rows: usize) {
        self.forward_pass.observe(took.as_secs_f64());
        self.batch_rows.observe(rows as f64);
        if padding_rows > 0 {
            self.padding_rows
                .inc_by(u64::try_from(padding_rows).unwrap_or(u64::MAX));
        }
    }
}

impl Default for BatchMetrics {
    fn default() -> Self {
        Self::detached()
    }
}

impl fmt::Debug for BatchMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchMetrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::sample;
    use prometheus::{Encoder, TextEncoder};

    fn text(m: &WorkerMetrics) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry().gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn version_handles_feed_the_labelled_series() {
        let m = WorkerMetrics::new();
        let v = m.version("mnist", "2");
        let mv = [("model", "mnist"), ("version", "2")];
        // OK exists at 0 before the first request.
        let ok = [("model", "mnist"), ("version", "2"), ("code", "OK")];
        assert_eq!(
            sample(&text(&m), "aspire_worker_requests_total", &ok),
            Some(0.0)
        );
        v.requests.record(0, Duration::from_millis(3));
        v.requests.record(0, Duration::from_millis(4));
        v.requests.record(3, Duration::from_millis(1));
        m.unresolved().record(5, Duration::from_micros(50));
        v.batch.set_queue_rows(5);
        v.batch.observe_queue_wait(Duration::from_micros(20));
        v.batch.observe_batch(Duration::from_millis(2), 3, 1);
        v.batch.observe_batch(Duration::from_millis(2), 4, 0);
        m.version_loaded("mnist", Duration::from_secs(2));
        m.version_load_failed("broken");
        m.set_versions_available([("mnist", 1), ("broken", 0)]);

        let t = text(&m);
        let get = |name: &str, labels: &[(&str, &str)]| sample(&t, name, labels);
        assert_eq!(get("aspire_worker_requests_total", &ok), Some(2.0));
        let invalid = [
            ("model", "mnist"),
            ("version", "2"),
            ("code", "InvalidArgument"),
        ];
        assert_eq!(get("aspire_worker_requests_total", &invalid), Some(1.0));
        let unresolved = [("model", ""), ("version", ""), ("code", "NotFound")];
        assert_eq!(get("aspire_worker_requests_total", &unresolved), Some(1.0));
        assert_eq!(
            get("aspire_worker_request_duration_seconds_count", &mv),
            Some(3.0)
        );
        assert_eq!(get("aspire_worker_queue_rows", &mv), Some(5.0));
        assert_eq!(
            get("aspire_worker_queue_wait_seconds_count", &mv),
            Some(1.0)
        );
        assert_eq!(
            get("aspire_worker_forward_pass_seconds_count", &mv),
            Some(2.0)
        );
        assert_eq!(get("aspire_worker_batch_rows_count", &mv), Some(2.0));
        assert_eq!(get("aspire_worker_batch_rows_sum", &mv), Some(7.0));
        let four = [("model", "mnist"), ("version", "2"), ("le", "4")];
        assert_eq!(get("aspire_worker_batch_rows_bucket", &four), Some(2.0));
        assert_eq!(
            get("aspire_worker_batch_padding_rows_total", &mv),
            Some(1.0)
        );
        let model = |m| [("model", m)];
        assert_eq!(
            get(
                "aspire_worker_version_load_duration_seconds_count",
                &model("mnist")
            ),
            Some(1.0)
        );
        assert_eq!(
            get(
                "aspire_worker_version_load_failures_total",
                &model("broken")
            ),
            Some(1.0)
        );
        assert_eq!(
            get("aspire_worker_versions_available", &model("mnist")),
            Some(1.0)
        );

        // A model that left loses its series.
        m.set_versions_available([("mnist", 2)]);
        let t = text(&m);
        assert_eq!(
            sample(&t, "aspire_worker_versions_available", &model("mnist")),
            Some(2.0)
        );
        assert_eq!(
            sample(&t, "aspire_worker_versions_available", &model("broken")),
            None
        );
    }

    #[test]
    fn a_version_loaded_again_continues_its_series() {
        let m = WorkerMetrics::new();
        m.version("m", "1").requests.record(0, Duration::ZERO);
        m.version("m", "1").requests.record(0, Duration::ZERO);
        let ok = [("model", "m"), ("version", "1"), ("code", "OK")];
        assert_eq!(
            sample(&text(&m), "aspire_worker_requests_total", &ok),
            Some(2.0)
        );
    }

    /// Prints what one observation costs on the request path. Run with
    /// `cargo test -p aspire-telemetry --release -- --ignored --nocapture observation_cost`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn observation_cost() {
        use std::time::Instant;
        const N: u32 = 1_000_000;
        let m = WorkerMetrics::new();
        let v = m.version("mnist", "1");
        let time = |what: &str, f: &dyn Fn(u32)| {
            for i in 0..N / 10 {
                f(i);
            }
            let started = Instant::now();
            for i in 0..N {
                f(i);
            }
            let ns = started.elapsed().as_nanos() as f64 / f64::from(N);
            println!("{what:<48} {ns:>6.1} ns/op");
        };
        time("request: counter (code OK) + latency histogram", &|i| {
            v.requests
                .record(0, Duration::from_micros(u64::from(i % 5000)))
        });
        time("queue wait histogram", &|i| {
            v.batch
                .observe_queue_wait(Duration::from_micros(u64::from(i % 5000)))
        });
        time("batch: forward histogram + rows histogram", &|i| {
            v.batch
                .observe_batch(Duration::from_micros(u64::from(i % 5000)), 8, 0)
        });
        time("queue depth gauge set", &|i| {
            v.batch.set_queue_rows(i as usize & 63)
        });
        time("Instant::now() (for scale)", &|_| {
            std::hint::black_box(Instant::now());
        });
        // Every thread on the same series: the worst case, as all requests of one hot
        // version are (prometheus' counters and histograms are shared atomics).
        let threads = std::thread::available_parallelism().map_or(2, usize::from);
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for i in 0..N {
                        v.requests
                            .record(0, Duration::from_micros(u64::from(i % 5000)));
                    }
                });
            }
        });
        let ns = started.elapsed().as_nanos() as f64 / f64::from(N);
        println!("request record, {threads} threads at once, per round {ns:>6.1} ns");
    }
}
