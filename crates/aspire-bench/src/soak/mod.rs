//! `aspire-bench soak` (`make soak`): steady load through the router for minutes while the
//! control plane is shaken — a new model version every 30 s, a pin and an unpin, etcd
//! restarted, a worker SIGKILLed and started again, etcd frozen for longer than the lease
//! TTL — counting every call. It prints a line per minute (calls, failures, p99, each
//! process's RSS) and a summary, and fails on any failed call, on a process's memory
//! growing past [`stats::GrowthBound`], on a fault it could not inject, or on a role that
//! exited on its own.
//!
//! - [`schedule`]: when each fault happens;
//! - [`stats`]: the per-minute counts, p99 and the growth check;
//! - [`stack`]: the processes and the model versions.

pub mod schedule;
pub mod stack;
pub mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::error::{Error, Result};
use crate::load;
use crate::proc_stat;
use crate::request::{self, RequestSpec};
use schedule::{Event, ScheduleConfig, Scheduled};
use stack::{Layout, MODEL, ProcessView, Stack, StackConfig};
use stats::{Growth, GrowthBound, RssSample, Timeline, clock, mib};

/// Callers sharing one HTTP/2 connection to the router.
const TASKS_PER_CONNECTION: usize = 4;

/// A caller's pause after a failed call, so a router that fails fast is not spun on.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_millis(10);

/// One soak run.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// The load's length (the stack's start and the exports come before it).
    pub total: Duration,
    /// The length of a reported period (a minute).
    pub period: Duration,
    /// A new version arrives this often.
    pub version_every: Duration,
    /// How long the killed worker stays down.
    pub worker_down: Duration,
    /// How long etcd stays frozen.
    pub freeze: Duration,
    /// `--lease-ttl` of every role, seconds.
    pub lease_ttl_secs: u64,
    /// Closed-loop callers.
    pub concurrency: usize,
    /// Deadline of each call.
    pub timeout: Duration,
    /// Where the binaries are.
    pub bin_dir: PathBuf,
    /// Where the soak's files go.
    pub dir: PathBuf,
    /// The MNIST CSV for `mnist-export` (its default when `None`).
    pub mnist_data: Option<PathBuf>,
    /// The memory growth allowed.
    pub bound: GrowthBound,
    /// How long the stack may take to serve its first call.
    pub ready_within: Duration,
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct SoakOutcome {
    /// Calls finished.
    pub requests: u64,
    /// Calls failed.
    pub failed: u64,
    /// Processes over the growth bound, one sentence each.
    pub exceeded: Vec<String>,
    /// Faults that could not be injected.
    pub event_failures: Vec<String>,
    /// Roles that exited on their own.
    pub unexpected_exits: Vec<String>,
}

impl SoakOutcome {
    /// Why the soak failed, one sentence each; empty when it passed.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.failed > 0 {
            out.push(format!(
                "{} of {} requests failed",
                self.failed, self.requests
            ));
        }
        if self.requests == 0 {
            out.push("no request finished".to_string());
        }
        out.extend(self.exceeded.iter().cloned());
        out.extend(self.event_failures.iter().cloned());
        out.extend(self.unexpected_exits.iter().cloned());
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The request every call sends: one MNIST image, no version named (the router picks).
fn mnist_request() -> Bytes {
    RequestSpec {
        model: MODEL.to_string(),
        signature: "predict_images".to_string(),
        version: None,
        input_name: "images".to_string(),
        shape: vec![1, 784],
    }
    .encoded()
}

/// Runs the soak: schedule, exports, the stack, the load; prints as it goes.
pub fn run_soak(config: &SoakConfig, runtime: &tokio::runtime::Runtime) -> Result<SoakOutcome> {
    let events = schedule::schedule(&ScheduleConfig {
        total: config.total,
        version_every: config.version_every,
        worker_down: config.worker_down,
        freeze: config.freeze,
        lease_ttl: Duration::from_secs(config.lease_ttl_secs),
    })
    .map_err(Error::InvalidOption)?;
    if config.concurrency == 0 {
        return Err(Error::InvalidOption(
            "--concurrency (SOAK_CONCURRENCY) must be at least 1".to_string(),
        ));
    }
    let dir = std::path::absolute(&config.dir)
        .map_err(|e| Error::io(format!("resolving --dir {}", config.dir.display()), e))?;
    let layout = Layout { dir };
    let last = schedule::last_version(&events);
    say(&format!(
        "exporting mnist versions 1..={last} into {} (kept for the next run)",
        layout.exports().display()
    ));
    stack::export_versions(&config.bin_dir, &layout, last, config.mnist_data.as_deref())?;
    say(&format!(
        "starting etcd, aspire-discovery, two aspire-workers and aspire-router from {} (logs in {})",
        config.bin_dir.display(),
        layout.logs().display()
    ));
    let stack = Stack::start(StackConfig {
        bin_dir: config.bin_dir.clone(),
        layout,
        lease_ttl_secs: config.lease_ttl_secs,
    })?;
    let stack = Arc::new(Mutex::new(stack));
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = drive(config, events, Arc::clone(&stack)) => outcome,
            () = crate::cli::shutdown_signal() => Err(Error::Stack(
                "interrupted (Ctrl-C or SIGTERM); stopping everything it started".to_string(),
            )),
        }
    });
    lock(&stack).shutdown();
    outcome
}

fn say(line: &str) {
    println!("soak: {line}");
}

/// Calls the router until one call is answered, within `config.ready_within`.
async fn wait_ready(
    channel: &Channel,
    body: &Bytes,
    config: &SoakConfig,
    router: &str,
) -> Result<()> {
    let deadline = Instant::now() + config.ready_within;
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    loop {
        let answer = load::call(&mut grpc, body.clone(), config.timeout).await;
        let last = match answer {
            Ok(bytes) => match request::check_response(&bytes) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            },
            Err(status) => format!("{:?}: {}", status.code(), status.message()),
        };
        if Instant::now() > deadline {
            return Err(Error::Stack(format!(
                "the router at {router} did not answer a Predict for {MODEL} within {} s \
                 (--ready-within-secs); its last answer: {last}",
                config.ready_within.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Memory readings by process name, and when each one's current incarnation started.
#[derive(Debug, Default)]
struct Memory {
    samples: BTreeMap<String, Vec<RssSample>>,
    started: BTreeMap<String, Duration>,
    order: Vec<String>,
}

impl Memory {
    /// Reads every process's RSS now; `processes` is the injector's latest view of the
    /// stack, so a fault holding the stack (a worker's start waits until it listens) does
    /// not delay the reading.
    fn read(&mut self, processes: Vec<ProcessView>, start: Instant) {
        let at = start.elapsed();
        for p in processes {
            if !self.order.contains(&p.name) {
                self.order.push(p.name.clone());
            }
            let bytes = p.pid.and_then(|pid| proc_stat::rss_bytes(pid).ok());
            self.samples
                .entry(p.name.clone())
                .or_default()
                .push(RssSample {
                    at,
                    pid: p.pid,
                    bytes,
                });
            self.started
                .insert(p.name, p.started.saturating_duration_since(start));
        }
    }

    fn line(&self) -> String {
        self.order
            .iter()
            .map(|name| {
                let value = self
                    .samples
                    .get(name)
                    .and_then(|s| s.last())
                    .and_then(|s| s.bytes)
                    .map_or_else(|| "-".to_string(), mib);
                format!("{name} {value}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Runs one fault and says what happened.
fn inject(stack: &Mutex<Stack>, event: Event) -> Result<String> {
    let mut stack = lock(stack);
    match event {
        Event::NewVersion(v) => stack.new_version(v).map(|()| String::new()),
        Event::Pin(v) => stack.pin(v),
        Event::Unpin => stack.unpin(),
        Event::EtcdRestart => stack.restart_etcd().map(|()| String::new()),
        Event::WorkerKill => stack.kill_worker().map(|pid| format!("pid {pid}")),
        Event::WorkerStart => stack
            .start_worker()
            .map(|pid| format!("pid {pid}, listening")),
        Event::EtcdFreeze => stack.freeze_etcd().map(|()| String::new()),
        Event::EtcdThaw => stack.thaw_etcd().map(|()| String::new()),
    }
}

async fn drive(
    config: &SoakConfig,
    events: Vec<Scheduled>,
    stack: Arc<Mutex<Stack>>,
) -> Result<SoakOutcome> {
    let router = lock(&stack).router_addr().to_string();
    let body = mnist_request();
    let connections = config.concurrency.div_ceil(TASKS_PER_CONNECTION);
    let channels = load::connect(&router, connections, config.timeout).await?;
    wait_ready(&channels[0], &body, config, &router).await?;
    say(&format!(
        "mnist v1 served at {router}; {} callers for {} s, one line per {} s",
        config.concurrency,
        config.total.as_secs(),
        config.period.as_secs()
    ));
    for (at, event) in &events {
        if !matches!(event, Event::NewVersion(_)) {
            say(&format!("scheduled at {}: {event}", clock(*at)));
        }
    }

    let start = Instant::now();
    let total = config.total;
    let timeline = Arc::new(Mutex::new(Timeline::new(config.period)));
    let memory = Arc::new(Mutex::new(Memory::default()));
    let views = Arc::new(Mutex::new(lock(&stack).processes()));
    lock(&memory).read(lock(&views).clone(), start);

    let (stop, stopped) = watch::channel(false);
    let mut callers = Vec::with_capacity(config.concurrency);
    for i in 0..config.concurrency {
        let mut grpc = tonic::client::Grpc::new(channels[i / TASKS_PER_CONNECTION].clone());
        let (body, timeline, timeout) = (body.clone(), Arc::clone(&timeline), config.timeout);
        let mut stopped = stopped.clone();
        callers.push(tokio::spawn(async move {
            while !*stopped.borrow() {
                let sent = Instant::now();
                let outcome = tokio::select! {
                    outcome = load::call(&mut grpc, body.clone(), timeout) => outcome,
                    // A call in flight at the end is not counted.
                    _ = stopped.changed() => break,
                };
                let done = Instant::now();
                let at = done.saturating_duration_since(start);
                if at >= total {
                    break;
                }
                let result = match outcome {
                    Ok(bytes) => request::check_response(&bytes).map(|_| ()),
                    Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
                };
                lock(&timeline).record(
                    at,
                    done - sent,
                    result.as_ref().map(|_| ()).map_err(String::as_str),
                );
                if result.is_err() {
                    tokio::time::sleep(PAUSE_AFTER_FAILURE).await;
                }
            }
        }));
    }

    let injector = {
        let (stack, views) = (Arc::clone(&stack), Arc::clone(&views));
        tokio::spawn(async move {
            let mut failures = Vec::new();
            for (at, event) in events {
                tokio::time::sleep_until((start + at).into()).await;
                let (stack, views) = (Arc::clone(&stack), Arc::clone(&views));
                let result = tokio::task::spawn_blocking(move || {
                    let result = inject(&stack, event);
                    *lock(&views) = lock(&stack).processes();
                    result
                })
                .await
                .unwrap_or_else(|e| Err(Error::Stack(format!("the fault task failed: {e}"))));
                let now = clock(start.elapsed());
                match result {
                    Ok(detail) if detail.is_empty() => println!("[{now}] {event}"),
                    Ok(detail) => println!("[{now}] {event}: {detail}"),
                    Err(e) => {
                        println!("[{now}] {event}: FAILED: {e}");
                        failures.push(format!("at {now}, {event}: {e}"));
                    }
                }
            }
            failures
        })
    };

    let mut unexpected_exits = Vec::new();
    let periods = usize::try_from(total.as_nanos().div_ceil(config.period.as_nanos())).unwrap_or(1);
    for i in 0..periods {
        let boundary = (config.period * u32::try_from(i + 1).unwrap_or(u32::MAX)).min(total);
        tokio::time::sleep_until((start + boundary).into()).await;
        lock(&memory).read(lock(&views).clone(), start);
        // Checked when no fault holds the stack; a busy stack is checked at the next line.
        let exits = match stack.try_lock() {
            Ok(mut stack) => stack.unexpected_exits(),
            Err(_) => Vec::new(),
        };
        // Let calls that finished at the boundary be counted.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let p = lock(&timeline).period(i);
        let p99 = p.p99().map_or_else(
            || "-".to_string(),
            |d| format!("{:.2} ms", d.as_secs_f64() * 1e3),
        );
        println!(
            "minute {:>2} [{}-{}]: {} requests, {} failed, p99 {p99} | RSS MiB: {}",
            i + 1,
            clock(config.period * u32::try_from(i).unwrap_or(u32::MAX)),
            clock(boundary),
            p.requests,
            p.failed,
            lock(&memory).line()
        );
        for (message, n) in &p.failures {
            println!("    {n} × {message}");
        }
        for exit in exits {
            println!("    {exit}");
            unexpected_exits.push(exit);
        }
    }
    let _ = stop.send(true);
    for caller in callers {
        let _ = caller.await;
    }
    let event_failures = injector
        .await
        .unwrap_or_else(|e| vec![format!("the fault task failed: {e}")]);
    drop(stop);
    for exit in lock(&stack).unexpected_exits() {
        println!("    {exit}");
        unexpected_exits.push(exit);
    }

    let timeline = lock(&timeline).clone();
    let memory = std::mem::take(&mut *lock(&memory));
    Ok(summarize(
        config,
        &timeline,
        &memory,
        event_failures,
        unexpected_exits,
    ))
}

fn summarize(
    config: &SoakConfig,
    timeline: &Timeline,
    memory: &Memory,
    event_failures: Vec<String>,
    unexpected_exits: Vec<String>,
) -> SoakOutcome {
    let total = timeline.total();
    let p99 = total.p99().map_or_else(
        || "-".to_string(),
        |d| format!("{:.2} ms", d.as_secs_f64() * 1e3),
    );
    let max = total.max().map_or_else(
        || "-".to_string(),
        |d| format!("{:.2} ms", d.as_secs_f64() * 1e3),
    );
    println!();
    println!(
        "soak total: {} requests, {} failed, p99 {p99}, slowest {max} ({} callers, {} s)",
        total.requests,
        total.failed,
        config.concurrency,
        config.total.as_secs()
    );
    if !total.failures.is_empty() {
        println!("failures (count × message, first seen):");
        let mut by_count: Vec<_> = total.failures.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1));
        for (message, n) in by_count {
            let first = timeline
                .first_seen(message)
                .map_or_else(String::new, |t| format!(" (first at {})", clock(t)));
            println!("  {n} × {message}{first}");
        }
    }
    println!(
        "memory (RSS MiB; bound: end <= {} × baseline + {} MiB, baseline = RSS a full {} s after the process started):",
        config.bound.factor,
        config.bound.slack_bytes >> 20,
        config.period.as_secs()
    );
    let mut exceeded = Vec::new();
    for name in &memory.order {
        let samples = memory.samples.get(name).map_or(&[][..], Vec::as_slice);
        let started = memory.started.get(name).copied().unwrap_or_default();
        let first = samples
            .first()
            .and_then(|s| s.bytes)
            .map_or_else(|| "-".to_string(), mib);
        let end = samples
            .last()
            .and_then(|s| s.bytes)
            .map_or_else(|| "-".to_string(), mib);
        let verdict = match growth_of(samples, started, config) {
            Growth::Within {
                baseline, limit, ..
            } => format!("baseline {}, limit {}: ok", mib(baseline), mib(limit)),
            Growth::Exceeded {
                baseline,
                end,
                limit,
            } => {
                exceeded.push(format!(
                    "{name}'s RSS grew from {} MiB to {} MiB, over its bound of {} MiB",
                    mib(baseline),
                    mib(end),
                    mib(limit)
                ));
                format!("baseline {}, limit {}: EXCEEDED", mib(baseline), mib(limit))
            }
            Growth::NotChecked(why) => format!("not checked: {why}"),
        };
        println!("  {name:<10} start {first:>7}  end {end:>7}  {verdict}");
    }
    SoakOutcome {
        requests: total.requests,
        failed: total.failed,
        exceeded,
        event_failures,
        unexpected_exits,
    }
}

fn growth_of(samples: &[RssSample], started: Duration, config: &SoakConfig) -> Growth {
    stats::growth(samples, started, config.period, config.bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_failure_fails_the_soak() {
        let ok = SoakOutcome {
            requests: 10,
            ..SoakOutcome::default()
        };
        assert!(ok.problems().is_empty());
        let failed = SoakOutcome {
            requests: 10,
            failed: 1,
            ..SoakOutcome::default()
        };
        assert_eq!(
            failed.problems(),
            vec!["1 of 10 requests failed".to_string()]
        );
        let nothing = SoakOutcome::default();
        assert_eq!(nothing.problems(), vec!["no request finished".to_string()]);
        let grew = SoakOutcome {
            requests: 10,
            exceeded: vec!["router grew".to_string()],
            event_failures: vec!["pin failed".to_string()],
            unexpected_exits: vec!["worker-1 exited".to_string()],
            ..SoakOutcome::default()
        };
        assert_eq!(grew.problems().len(), 3);
    }

    #[test]
    fn the_request_is_one_mnist_image_without_a_version() {
        use prost::Message;
        let decoded = aspire_proto::serving::PredictRequest::decode(mnist_request()).unwrap();
        let spec = decoded.model_spec.unwrap();
        assert_eq!(spec.name, MODEL);
        assert!(spec.version_choice.is_none());
        assert_eq!(decoded.inputs["images"].tensor_content.len(), 784 * 4);
    }
}
