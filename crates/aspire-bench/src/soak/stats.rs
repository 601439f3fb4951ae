//! What the soak counts: calls per period (a minute by default) with their failures and
//! latencies, each process's resident memory at every period boundary, and the check of
//! memory growth against a stated bound. Pure bookkeeping, tested without processes.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Distinct failure messages kept per period (and for the run); more are counted under
/// [`OTHER_FAILURES`].
pub const MAX_DISTINCT_FAILURES: usize = 50;

/// The key further distinct failures are counted under.
pub const OTHER_FAILURES: &str = "(other failures)";

/// Longest failure message kept, in characters.
const MAX_MESSAGE_CHARS: usize = 300;

/// One period's calls.
#[derive(Debug, Clone)]
pub struct Period {
    /// Calls finished in the period, answered or failed.
    pub requests: u64,
    /// Calls that failed (a gRPC error, a deadline, or an answer that is not a prediction).
    pub failed: u64,
    /// Latencies of the answered calls, ns.
    latencies: Histogram<u64>,
    /// Failures by message.
    pub failures: BTreeMap<String, u64>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

impl Default for Period {
    fn default() -> Self {
        Self {
            requests: 0,
            failed: 0,
            latencies: new_histogram(),
            failures: BTreeMap::new(),
        }
    }
}

impl Period {
    /// The 99th percentile latency of the answered calls, or `None` when none was.
    pub fn p99(&self) -> Option<Duration> {
        (!self.latencies.is_empty())
            .then(|| Duration::from_nanos(self.latencies.value_at_quantile(0.99)))
    }

    /// The slowest answered call.
    pub fn max(&self) -> Option<Duration> {
        (!self.latencies.is_empty()).then(|| Duration::from_nanos(self.latencies.max()))
    }

    fn add_failure(&mut self, message: &str, n: u64) {
        count_failure(&mut self.failures, message, n);
    }

    fn merge(&mut self, other: &Self) {
        self.requests += other.requests;
        self.failed += other.failed;
        // Same bounds: adding cannot fail.
        let _ = self.latencies.add(&other.latencies);
        for (message, n) in &other.failures {
            self.add_failure(message, *n);
        }
    }
}

fn count_failure(failures: &mut BTreeMap<String, u64>, message: &str, n: u64) {
    let key = if failures.contains_key(message) || failures.len() < MAX_DISTINCT_FAILURES {
        message.to_string()
    } else {
        OTHER_FAILURES.to_string()
    };
    *failures.entry(key).or_default() += n;
}

/// Shortens a failure message to what the report keeps.
pub fn failure_key(message: &str) -> String {
    let one_line = message.replace(['\n', '\r'], " ");
    match one_line.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

/// The calls of a run, bucketed by when they finished.
#[derive(Debug, Clone)]
pub struct Timeline {
    period: Duration,
    periods: Vec<Period>,
    /// When each distinct failure message was first seen, from the start.
    first_seen: BTreeMap<String, Duration>,
}

impl Timeline {
    /// An empty timeline of `period`-long buckets (a zero period counts as one second).
    pub fn new(period: Duration) -> Self {
        Self {
            period: if period.is_zero() {
                Duration::from_secs(1)
            } else {
                period
            },
            periods: Vec::new(),
            first_seen: BTreeMap::new(),
        }
    }

    /// The bucket a call finishing `at` after the start falls in.
    pub fn index(&self, at: Duration) -> usize {
        usize::try_from(at.as_nanos() / self.period.as_nanos()).unwrap_or(usize::MAX)
    }

    /// Counts a call that finished `at` after the start, took `latency`, and was answered
    /// (`Ok`) or failed with a message.
    pub fn record(&mut self, at: Duration, latency: Duration, outcome: Result<(), &str>) {
        let i = self.index(at);
        if i >= self.periods.len() {
            // A bound on memory: a clock gone mad must not allocate without end.
            if i > 100_000 {
                return;
            }
            self.periods.resize_with(i + 1, Period::default);
        }
        let period = &mut self.periods[i];
        period.requests += 1;
        match outcome {
            Ok(()) => {
                let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
                period.latencies.saturating_record(ns.max(1));
            }
            Err(message) => {
                period.failed += 1;
                let key = failure_key(message);
                if self.first_seen.len() < MAX_DISTINCT_FAILURES {
                    self.first_seen.entry(key.clone()).or_insert(at);
                }
                period.add_failure(&key, 1);
            }
        }
    }

    /// Bucket `i` (empty when nothing finished in it).
    pub fn period(&self, i: usize) -> Period {
        self.periods.get(i).cloned().unwrap_or_default()
    }

    /// Every bucket together.
    pub fn total(&self) -> Period {
        let mut total = Period::default();
        for p in &self.periods {
            total.merge(p);
        }
        total
    }

    /// When `message` (as [`failure_key`] keeps it) was first seen.
    pub fn first_seen(&self, message: &str) -> Option<Duration> {
        self.first_seen.get(message).copied()
    }
}

/// One reading of a process's resident memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssSample {
    /// When, from the start of the load.
    pub at: Duration,
    /// The process id read (a restart changes it); `None` while the process is down.
    pub pid: Option<u32>,
    /// `VmRSS`, bytes; `None` when it could not be read.
    pub bytes: Option<u64>,
}

/// How much a process's memory may grow: at the end at most `factor` × its baseline plus
/// `slack_bytes`. The baseline is its RSS at the first period boundary at least one period
/// after it started (for a process up from the start: after the first minute), so start-up
/// allocation (the model load, etcd's first compaction) is not counted as growth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrowthBound {
    /// Multiplier on the baseline.
    pub factor: f64,
    /// Added allowance, bytes.
    pub slack_bytes: u64,
}

impl Default for GrowthBound {
    fn default() -> Self {
        Self {
            factor: 1.5,
            slack_bytes: 64 << 20,
        }
    }
}

impl GrowthBound {
    /// The most `baseline` may grow to.
    pub fn limit(&self, baseline: u64) -> u64 {
        let scaled = (baseline as f64 * self.factor).min(u64::MAX as f64) as u64;
        scaled.saturating_add(self.slack_bytes)
    }
}

/// The growth check of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Growth {
    /// The end reading is within the bound.
    Within {
        /// RSS at the baseline, bytes.
        baseline: u64,
        /// RSS at the end, bytes.
        end: u64,
        /// The bound, bytes.
        limit: u64,
    },
    /// The end reading is over the bound: the soak fails.
    Exceeded {
        /// RSS at the baseline, bytes.
        baseline: u64,
        /// RSS at the end, bytes.
        end: u64,
        /// The bound, bytes.
        limit: u64,
    },
    /// Not checked, and why (restarted too late to have a baseline, down at the end).
    NotChecked(String),
}

/// Checks the growth of one process from its readings, in time order; `started_at` is when
/// its current incarnation (the last pid) was started, from the start of the load;
/// `period` is the baseline's distance from it.
pub fn growth(
    samples: &[RssSample],
    started_at: Duration,
    period: Duration,
    bound: GrowthBound,
) -> Growth {
    let Some(end) = samples.last() else {
        return Growth::NotChecked("no readings".to_string());
    };
    let (Some(pid), Some(end_bytes)) = (end.pid, end.bytes) else {
        return Growth::NotChecked("not running at the end".to_string());
    };
    let baseline = samples
        .iter()
        .filter(|s| s.pid == Some(pid) && s.at >= started_at + period)
        .find_map(|s| s.bytes.map(|b| (s.at, b)));
    match baseline {
        Some((at, baseline)) if at < end.at => {
            let limit = bound.limit(baseline);
            if end_bytes > limit {
                Growth::Exceeded {
                    baseline,
                    end: end_bytes,
                    limit,
                }
            } else {
                Growth::Within {
                    baseline,
                    end: end_bytes,
                    limit,
                }
            }
        }
        _ => Growth::NotChecked(format!(
            "(re)started at {}: no reading a full period after its start and before the end",
            clock(started_at)
        )),
    }
}

/// `mm:ss` of a time from the start.
pub fn clock(at: Duration) -> String {
    let s = at.as_secs();
    format!("{:02}:{:02}", s / 60, s % 60)
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn calls_fall_in_the_minute_they_finish_in() {
        let mut t = Timeline::new(MINUTE);
        t.record(ms(0), ms(1), Ok(()));
        t.record(ms(59_999), ms(1), Ok(()));
        t.record(ms(60_000), ms(2), Ok(()));
        t.record(ms(61_000), ms(3), Err("Unavailable: no worker"));
        t.record(ms(62_000), ms(3), Err("Unavailable: no worker"));
        t.record(ms(190_000), ms(3), Err("DeadlineExceeded: late"));
        let m0 = t.period(0);
        assert_eq!((m0.requests, m0.failed), (2, 0));
        let m1 = t.period(1);
        assert_eq!((m1.requests, m1.failed), (3, 2));
        assert_eq!(m1.failures["Unavailable: no worker"], 2);
        // A minute with nothing finished in it is empty, not missing.
        let m2 = t.period(2);
        assert_eq!((m2.requests, m2.failed, m2.p99()), (0, 0, None));
        assert_eq!(t.period(3).failed, 1);
        let total = t.total();
        assert_eq!((total.requests, total.failed), (6, 3));
        assert_eq!(total.failures.len(), 2);
        assert_eq!(t.first_seen("Unavailable: no worker"), Some(ms(61_000)));
        assert_eq!(t.first_seen("DeadlineExceeded: late"), Some(ms(190_000)));
    }

    #[test]
    fn p99_is_of_the_answered_calls_only() {
        let mut t = Timeline::new(MINUTE);
        // 990 calls of 1 ms, 10 of 100 ms: the 99th percentile is 1 ms, the 99.1th 100.
        for i in 0..1000u64 {
            let latency = if i < 990 { ms(1) } else { ms(100) };
            t.record(ms(i), latency, Ok(()));
        }
        // A failure that took a minute is not a latency.
        t.record(ms(5), Duration::from_secs(60), Err("DeadlineExceeded"));
        let p = t.period(0);
        let p99 = p.p99().unwrap();
        assert!(p99 >= ms(1) && p99 < ms(2), "{p99:?}");
        let max = p.max().unwrap();
        assert!(max >= ms(99) && max <= ms(101), "{max:?}");
        // 20 slow calls in 1000: the 99th percentile is slow.
        let mut t = Timeline::new(MINUTE);
        for i in 0..1000u64 {
            t.record(ms(i), if i < 980 { ms(1) } else { ms(100) }, Ok(()));
        }
        let p99 = t.period(0).p99().unwrap();
        assert!(p99 >= ms(99), "{p99:?}");
    }

    #[test]
    fn distinct_failures_are_bounded_and_shortened() {
        let mut t = Timeline::new(MINUTE);
        for i in 0..(MAX_DISTINCT_FAILURES + 10) {
            t.record(ms(1), ms(1), Err(&format!("failure {i}")));
        }
        let p = t.period(0);
        assert_eq!(p.failures.len(), MAX_DISTINCT_FAILURES + 1);
        assert_eq!(p.failures[OTHER_FAILURES], 10);
        assert_eq!(p.failed, (MAX_DISTINCT_FAILURES + 10) as u64);
        let long = "x".repeat(1000);
        let key = failure_key(&format!("a\nb {long}"));
        assert!(key.starts_with("a b x") && key.ends_with('…'), "{key}");
        assert_eq!(key.chars().count(), MAX_MESSAGE_CHARS + 1);
    }

    fn sample(secs: u64, pid: Option<u32>, mib: Option<u64>) -> RssSample {
        RssSample {
            at: Duration::from_secs(secs),
            pid,
            bytes: mib.map(|m| m << 20),
        }
    }

    #[test]
    fn growth_is_measured_from_the_first_minute() {
        let bound = GrowthBound::default();
        assert_eq!(bound.limit(100 << 20), (150 + 64) << 20);
        // 40 MiB at start (not the baseline), 100 after a minute, 214 at the end: within.
        let ok = [
            sample(0, Some(7), Some(40)),
            sample(60, Some(7), Some(100)),
            sample(120, Some(7), Some(214)),
        ];
        assert_eq!(
            growth(&ok, Duration::ZERO, MINUTE, bound),
            Growth::Within {
                baseline: 100 << 20,
                end: 214 << 20,
                limit: 214 << 20
            }
        );
        let leak = [
            sample(0, Some(7), Some(40)),
            sample(60, Some(7), Some(100)),
            sample(600, Some(7), Some(215)),
        ];
        assert!(matches!(
            growth(&leak, Duration::ZERO, MINUTE, bound),
            Growth::Exceeded { .. }
        ));
    }

    #[test]
    fn a_restarted_process_is_measured_from_its_new_start() {
        let bound = GrowthBound::default();
        // Killed at 300 s, started at 305 s: the old pid's readings do not count.
        let samples = [
            sample(0, Some(7), Some(100)),
            sample(60, Some(7), Some(100)),
            sample(300, None, None),
            sample(360, Some(9), Some(150)),
            sample(420, Some(9), Some(400)),
            sample(600, Some(9), Some(160)),
        ];
        let started = Duration::from_secs(305);
        // Baseline: 420 s (the first reading >= 365 s), not 360 s.
        assert_eq!(
            growth(&samples, started, MINUTE, bound),
            Growth::Within {
                baseline: 400 << 20,
                end: 160 << 20,
                limit: (600 + 64) << 20
            }
        );
        // Restarted less than a period before the end: not checked, and it says why.
        let late = [
            sample(60, Some(7), Some(100)),
            sample(120, Some(9), Some(100)),
        ];
        let Growth::NotChecked(why) = growth(&late, Duration::from_secs(71), MINUTE, bound) else {
            panic!("checked");
        };
        assert!(why.contains("01:11"), "{why}");
        let down = [sample(60, Some(7), Some(100)), sample(120, None, None)];
        assert!(matches!(
            growth(&down, Duration::ZERO, MINUTE, bound),
            Growth::NotChecked(_)
        ));
        assert!(matches!(
            growth(&[], Duration::ZERO, MINUTE, bound),
            Growth::NotChecked(_)
        ));
    }

    #[test]
    fn clock_and_mib() {
        assert_eq!(clock(Duration::from_secs(75)), "01:15");
        assert_eq!(mib(3 << 19), "1.5");
    }
}
