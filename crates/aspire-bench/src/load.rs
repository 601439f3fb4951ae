//! The closed-loop load generator: `concurrency` tasks, each with one Predict call in
//! flight at a time, sending the same pre-encoded request for a warm-up and then a measured
//! window; latencies go into HdrHistograms, and the CPU time of this process and of any
//! watched process (router, worker) is read when the window opens and closes.
//!
//! Connections: tonic multiplexes every call of a channel onto one HTTP/2 connection,
//! whose single reader and writer bound what 128 callers can push through it, so tasks
//! share a small pool instead: one connection per `tasks_per_connection` tasks (16 by
//! default: 1 connection at concurrency 1–16, 2 at 32, 8 at 128).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant as TokioInstant;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

use crate::codec::BytesCodec;
use crate::error::{Error, Result};
use crate::proc_stat;
use crate::request::{self, RequestSpec};
use crate::worker_metrics::{self, WorkerView};

/// The gRPC method every call goes to.
pub const PREDICT_PATH: &str = "/tensorflow.serving.PredictionService/Predict";

/// A process whose CPU time is charged to the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// What to call it in the report (`router`, `worker`).
    pub name: String,
    /// Its process id.
    pub pid: u32,
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `host:port` or an `http://` URI.
    pub server: String,
    /// What each call asks for.
    pub request: RequestSpec,
    /// Calls in flight at once (tasks).
    pub concurrency: usize,
    /// Tasks that share one HTTP/2 connection.
    pub tasks_per_connection: usize,
    /// Time before the measured window (not measured).
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// The gRPC deadline of each call.
    pub timeout: Duration,
    /// Processes whose CPU time over the window is reported.
    pub watch: Vec<Watched>,
    /// The worker's Prometheus endpoint, scraped when the window opens and closes.
    pub worker_metrics_url: Option<String>,
    /// Free-form labels copied into the report (model, path, batching, ...).
    pub tags: BTreeMap<String, String>,
}

/// Latency percentiles of the answered calls in the window, µs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Mean.
    pub mean_us: f64,
    /// Fastest.
    pub min_us: f64,
    /// Slowest.
    pub max_us: f64,
}

/// CPU time a process used over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuUse {
    /// Process id (this process for the generator).
    pub pid: u32,
    /// CPU seconds (user + system) over the window.
    pub cpu_s: f64,
    /// CPU µs per answered call.
    pub us_per_request: f64,
    /// Cores it kept busy on average.
    pub cores: f64,
}

/// What one run measured: printed as one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The labels given with `--tag`.
    pub tags: BTreeMap<String, String>,
    /// The server driven.
    pub server: String,
    /// Tasks, each with one call in flight.
    pub concurrency: usize,
    /// HTTP/2 connections the tasks shared.
    pub connections: usize,
    /// Bytes of one encoded request.
    pub request_bytes: usize,
    /// Calls answered OK within the window.
    pub requests: u64,
    /// Failed calls within the window, by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// The warm-up's length, seconds (past the time asked for when a round of calls took longer).
    #[serde(default)]
    pub warmup_s: f64,
    /// The window's length, seconds.
    pub duration_s: f64,
    /// Answered calls per second.
    pub throughput_rps: f64,
    /// Latencies of the answered calls.
    pub latency: Latency,
    /// This process's CPU.
    pub generator_cpu: CpuUse,
    /// The watched processes' CPU, by name.
    pub watched_cpu: BTreeMap<String, CpuUse>,
    /// Cores kept busy over the window by everything else on the machine: all CPU time
    /// (`/proc/stat`) less the generator's and the watched processes'. Other people's
    /// compiles show up here; a quiet machine reads a few hundredths (etcd, discovery,
    /// the kernel's own work).
    #[serde(default)]
    pub other_cores: f64,
    /// What the worker measured over the window, when its metrics were scraped.
    pub worker: Option<WorkerView>,
    /// The outputs of the check call's answer: name and elements.
    pub outputs: Vec<(String, usize)>,
}

/// The longest the warm-up waits, past the time asked for, for every caller's first answer.
pub const MAX_EXTRA_WARMUP: Duration = Duration::from_secs(60);

/// The measured window, shared with the callers: nanoseconds from `start` to its opening
/// and closing, 0 while not yet.
struct Window {
    start: Instant,
    opened_ns: AtomicU64,
    closed_ns: AtomicU64,
    first_calls_done: AtomicUsize,
}

impl Window {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            opened_ns: AtomicU64::new(0),
            closed_ns: AtomicU64::new(0),
            first_calls_done: AtomicUsize::new(0),
        }
    }

    fn offset(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.start).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn open(&self) -> Instant {
        let now = Instant::now();
        self.opened_ns.store(self.offset(now), Ordering::Relaxed);
        now
    }

    fn close(&self) -> Instant {
        let now = Instant::now();
        self.closed_ns.store(self.offset(now), Ordering::Relaxed);
        now
    }

    /// Whether a call answered at `done` counts.
    fn contains(&self, done: Instant) -> bool {
        let opened = self.opened_ns.load(Ordering::Relaxed);
        let closed = self.closed_ns.load(Ordering::Relaxed);
        let at = self.offset(done);
        opened != 0 && at >= opened && (closed == 0 || at <= closed)
    }
}

struct TaskResult {
    histogram: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

fn uri_of(server: &str) -> String {
    if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    }
}

/// Opens `n` separate HTTP/2 connections to `server`.
pub(crate) async fn connect(server: &str, n: usize, timeout: Duration) -> Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(uri_of(server))
        .map_err(|e| Error::InvalidOption(format!("--server {server:?} is not an address: {e}")))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = endpoint.connect().await.map_err(|source| Error::Connect {
            address: server.to_string(),
            source,
        })?;
        channels.push(channel);
    }
    Ok(channels)
}

pub(crate) async fn call(
    grpc: &mut tonic::client::Grpc<Channel>,
    body: Bytes,
    timeout: Duration,
) -> Result<Bytes, tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
    let mut request = tonic::Request::new(body);
    request.set_timeout(timeout);
    let path = PathAndQuery::from_static(PREDICT_PATH);
    grpc.unary(request, path, BytesCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// The name of a gRPC code as tonic spells it (`Unavailable`, ...).
fn code_name(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

fn cpu_use(pid: u32, cpu: Duration, requests: u64, window: Duration) -> CpuUse {
    let cpu_s = cpu.as_secs_f64();
    CpuUse {
        pid,
        cpu_s,
        us_per_request: if requests == 0 {
            0.0
        } else {
            cpu_s * 1e6 / requests as f64
        },
        cores: cpu_s / window.as_secs_f64().max(1e-9),
    }
}

fn scrape(url: &Option<String>, model: &str) -> Option<worker_metrics::Sample> {
    let url = url.as_ref()?;
    match worker_metrics::fetch(url, Duration::from_secs(2)) {
        Ok(text) => Some(worker_metrics::parse(&text, model)),
        Err(e) => {
            eprintln!("aspire-bench: cannot scrape the worker's metrics: {e}");
            None
        }
    }
}

struct Snapshot {
    machine: Duration,
    generator: Duration,
    watched: Vec<Option<Duration>>,
    metrics: Option<worker_metrics::Sample>,
}

fn snapshot(config: &LoadConfig) -> Snapshot {
    // CPU first, at the window's edge; the scrape after it takes a few ms.
    let machine = proc_stat::machine_busy().unwrap_or_default();
    let generator = proc_stat::cpu_time(None).unwrap_or_default();
    let watched = config
        .watch
        .iter()
        .map(|w| proc_stat::cpu_time(Some(w.pid)).ok())
        .collect();
    let metrics = scrape(&config.worker_metrics_url, &config.request.model);
    Snapshot {
        machine,
        generator,
        watched,
        metrics,
    }
}

/// Runs the load and reports what the window saw. Fails before any load if the server
/// cannot be reached or answers the check call with an error.
pub async fn run_load(config: &LoadConfig) -> Result<LoadReport> {
    if config.concurrency == 0 || config.tasks_per_connection == 0 {
        return Err(Error::InvalidOption(
            "--concurrency and --tasks-per-connection must be at least 1".to_string(),
        ));
    }
    if config.duration.is_zero() {
        return Err(Error::InvalidOption(
            "--duration-secs is 0; the measured window needs some time".to_string(),
        ));
    }
    let body = config.request.encoded();
    let connections = config.concurrency.div_ceil(config.tasks_per_connection);
    let channels = connect(&config.server, connections, config.timeout).await?;

    // One call first: a run against a server that only fails would measure nothing.
    let mut check = tonic::client::Grpc::new(channels[0].clone());
    let answer = call(&mut check, body.clone(), config.timeout)
        .await
        .map_err(|s| Error::CheckRequest {
            address: config.server.clone(),
            message: format!("{:?}: {}", s.code(), s.message()),
        })?;
    let outputs = request::check_response(&answer).map_err(|message| Error::CheckRequest {
        address: config.server.clone(),
        message,
    })?;

    let window = Arc::new(Window::new());
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::with_capacity(config.concurrency);
    for i in 0..config.concurrency {
        let mut grpc = tonic::client::Grpc::new(channels[i / config.tasks_per_connection].clone());
        let body = body.clone();
        let timeout = config.timeout;
        let window = Arc::clone(&window);
        let mut stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let mut result = TaskResult {
                histogram: new_histogram(),
                errors: BTreeMap::new(),
            };
            let mut first_call = true;
            while !*stopped.borrow() {
                let sent = Instant::now();
                let outcome = tokio::select! {
                    outcome = call(&mut grpc, body.clone(), timeout) => outcome,
                    // A call still in flight when the window closes is not counted.
                    _ = stopped.changed() => break,
                };
                let done = Instant::now();
                if first_call {
                    first_call = false;
                    window.first_calls_done.fetch_add(1, Ordering::Relaxed);
                }
                if !window.contains(done) {
                    continue;
                }
                match outcome {
                    Ok(_) => {
                        let ns = u64::try_from((done - sent).as_nanos()).unwrap_or(u64::MAX);
                        result.histogram.saturating_record(ns.max(1));
                    }
                    Err(status) => *result.errors.entry(code_name(&status)).or_default() += 1,
                }
            }
            result
        }));
    }

    // Warm-up: the time asked for, and until every caller has had an answer, so the
    // server's queue has reached the depth this concurrency keeps it at (a slow model at
    // high concurrency takes longer than the warm-up for one round).
    tokio::time::sleep(config.warmup).await;
    let give_up = Instant::now() + MAX_EXTRA_WARMUP;
    while window.first_calls_done.load(Ordering::Relaxed) < config.concurrency
        && Instant::now() < give_up
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let warmup_s = window.start.elapsed().as_secs_f64();
    let opened = window.open();
    let config_copy = config.clone();
    let first = tokio::task::spawn_blocking(move || snapshot(&config_copy))
        .await
        .expect("the snapshot task does not panic");
    tokio::time::sleep_until(TokioInstant::from_std(opened + config.duration)).await;
    let closed = window.close();
    let config_copy = config.clone();
    let last = tokio::task::spawn_blocking(move || snapshot(&config_copy))
        .await
        .expect("the snapshot task does not panic");
    let _ = stop.send(true);

    let mut histogram = new_histogram();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for task in tasks {
        let r = task.await.expect("a load task does not panic");
        histogram
            .add(&r.histogram)
            .expect("histograms with the same bounds add");
        for (code, n) in r.errors {
            *errors.entry(code).or_default() += n;
        }
    }
    let window = closed - opened;
    let requests = histogram.len();
    let us = |ns: u64| ns as f64 / 1e3;
    let latency = if requests == 0 {
        Latency::default()
    } else {
        Latency {
            p50_us: us(histogram.value_at_quantile(0.50)),
            p90_us: us(histogram.value_at_quantile(0.90)),
            p99_us: us(histogram.value_at_quantile(0.99)),
            p999_us: us(histogram.value_at_quantile(0.999)),
            mean_us: histogram.mean() / 1e3,
            min_us: us(histogram.min()),
            max_us: us(histogram.max()),
        }
    };
    let watched_cpu: BTreeMap<String, CpuUse> = config
        .watch
        .iter()
        .zip(first.watched.iter().zip(&last.watched))
        .filter_map(|(w, (a, b))| {
            let used = b.as_ref()?.saturating_sub(*a.as_ref()?);
            Some((w.name.clone(), cpu_use(w.pid, used, requests, window)))
        })
        .collect();
    let generator_cpu = cpu_use(
        std::process::id(),
        last.generator.saturating_sub(first.generator),
        requests,
        window,
    );
    let known: f64 = generator_cpu.cpu_s + watched_cpu.values().map(|u| u.cpu_s).sum::<f64>();
    let all = last.machine.saturating_sub(first.machine).as_secs_f64();
    let other_cores = ((all - known) / window.as_secs_f64().max(1e-9)).max(0.0);
    let worker = match (&first.metrics, &last.metrics) {
        (Some(a), Some(b)) => WorkerView::between(a, b),
        _ => None,
    };
    Ok(LoadReport {
        tags: config.tags.clone(),
        server: config.server.clone(),
        concurrency: config.concurrency,
        connections,
        request_bytes: body.len(),
        requests,
        errors,
        warmup_s,
        duration_s: window.as_secs_f64(),
        throughput_rps: requests as f64 / window.as_secs_f64(),
        latency,
        generator_cpu,
        watched_cpu,
        other_cores,
        worker,
        outputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_uris() {
        assert_eq!(uri_of("127.0.0.1:8500"), "http://127.0.0.1:8500");
        assert_eq!(uri_of("http://h:1"), "http://h:1");
    }

    #[test]
    fn cpu_per_request_and_cores() {
        let c = cpu_use(1, Duration::from_millis(500), 1000, Duration::from_secs(1));
        assert!((c.us_per_request - 500.0).abs() < 1e-9);
        assert!((c.cores - 0.5).abs() < 1e-9);
        assert_eq!(
            cpu_use(1, Duration::ZERO, 0, Duration::ZERO).us_per_request,
            0.0
        );
    }
}
