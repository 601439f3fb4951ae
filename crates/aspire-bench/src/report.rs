//! The report of `make bench`: reads the JSON lines the runs wrote (one [`LoadReport`]
//! or [`ComputePoint`] per line) and renders the one markdown table, the ratios the issue
//! asks for and each target as met or missed, with the numbers.
//!
//! Tags the rows carry: `model` (e.g. `mnist`), `path` (`direct`, `router` or `transport`)
//! and `batching` (`on`, `off`; `-` for the transport ceiling).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::compute::ComputePoint;
use crate::error::{Error, Result};
use crate::load::LoadReport;

/// The model the MNIST targets are about.
pub const MNIST: &str = "mnist";
/// The larger model.
pub const RESNET: &str = "resnet18";

/// Other load, in cores, from which a run counts as disturbed.
pub const NOISY_CORES: f64 = 0.25;

/// One line of a results file: a JSON object whose `kind` says which.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Record {
    /// A load run.
    Load(Box<LoadReport>),
    /// One batch size of a compute ceiling.
    Compute(ComputePoint),
}

/// Every run of one benchmark.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Results {
    /// The load runs, in the order they ran.
    pub loads: Vec<LoadReport>,
    /// The compute-ceiling points, in the order they ran.
    pub computes: Vec<ComputePoint>,
}

impl Results {
    /// Parses a results file: one JSON object per line, blank lines ignored.
    pub fn parse(text: &str) -> Result<Self> {
        let mut results = Self::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let record: Record = serde_json::from_str(line).map_err(|e| {
                Error::BadResult(format!("results line {}: {e}: {line:.120}", i + 1))
            })?;
            match record {
                Record::Load(r) => results.loads.push(*r),
                Record::Compute(p) => results.computes.push(p),
            }
        }
        Ok(results)
    }

    /// The models, in the order they first appear.
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = Vec::new();
        let names = self
            .loads
            .iter()
            .map(|r| &r.tags)
            .chain(self.computes.iter().map(|p| &p.tags))
            .filter_map(|t| t.get("model"));
        for name in names {
            if !models.contains(name) {
                models.push(name.clone());
            }
        }
        models
    }

    /// The load run of `model` on `path` with `batching` at `concurrency`.
    pub fn load(
        &self,
        model: &str,
        path: &str,
        batching: &str,
        concurrency: usize,
    ) -> Option<&LoadReport> {
        self.loads.iter().rev().find(|r| {
            tag(&r.tags, "model") == model
                && tag(&r.tags, "path") == path
                && tag(&r.tags, "batching") == batching
                && r.concurrency == concurrency
        })
    }

    /// The concurrencies measured, ascending.
    pub fn concurrencies(&self) -> Vec<usize> {
        let mut c: Vec<usize> = self.loads.iter().map(|r| r.concurrency).collect();
        c.sort_unstable();
        c.dedup();
        c
    }

    /// The compute point of `model` at `batch`.
    pub fn compute(&self, model: &str, batch: usize) -> Option<&ComputePoint> {
        self.computes
            .iter()
            .rev()
            .find(|p| tag(&p.tags, "model") == model && p.batch == batch)
    }

    /// The compute ceiling of `model` for the direct, batching-on run at `concurrency`,
    /// in rows/s, and how it was chosen: the forward pass at the batch size the batcher
    /// formed (its mean, rounded, from the worker's metrics) when that is known and was
    /// measured, else the best measured batch size that `concurrency` one-row requests can
    /// fill (at most `concurrency` rows).
    pub fn compute_ceiling(&self, model: &str, concurrency: usize) -> Option<(f64, String)> {
        let formed = self
            .load(model, "direct", "on", concurrency)
            .and_then(|r| r.worker.as_ref())
            .and_then(|w| w.mean_batch_rows);
        if let Some(mean) = formed {
            let batch = (mean.round() as usize).max(1);
            if let Some(p) = self.compute(model, batch) {
                return Some((
                    p.rows_per_s,
                    format!("forward pass at batch {batch}, the batcher's mean of {mean:.1}"),
                ));
            }
        }
        self.computes
            .iter()
            .filter(|p| tag(&p.tags, "model") == model && p.batch <= concurrency)
            .max_by(|a, b| a.rows_per_s.total_cmp(&b.rows_per_s))
            .map(|p| {
                (
                    p.rows_per_s,
                    format!(
                        "best forward pass at batch ≤ {concurrency} (batch {})",
                        p.batch
                    ),
                )
            })
    }

    /// The batch sizes to time in the compute ceiling of `model`: `base`, plus the rounded
    /// mean batch size of each batching-on run (so the ceiling is measured at the sizes
    /// the batcher formed), ascending.
    pub fn batch_sizes_to_measure(&self, model: &str, base: &[usize]) -> Vec<usize> {
        let mut sizes: Vec<usize> = base.to_vec();
        for r in &self.loads {
            if tag(&r.tags, "model") != model || tag(&r.tags, "batching") != "on" {
                continue;
            }
            if let Some(mean) = r.worker.as_ref().and_then(|w| w.mean_batch_rows) {
                sizes.push((mean.round() as usize).max(1));
            }
        }
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }
}

fn tag<'a>(tags: &'a std::collections::BTreeMap<String, String>, key: &str) -> &'a str {
    tags.get(key).map_or("-", String::as_str)
}

/// A rate: whole numbers from 100 up, one decimal below.
fn rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// A latency given in µs, written in ms: three decimals below 10 ms, one above.
fn ms(us: f64) -> String {
    let ms = us / 1e3;
    if ms < 10.0 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.1}")
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "–".to_string(), f)
}

/// The batching label of the runs against a worker with one batch thread (and so all
/// CPUs as intra-op threads of each forward pass), batching on.
pub const ONE_THREAD: &str = "on, 1 batch thread";

const PATHS: [(&str, &str); 6] = [
    ("transport", "-"),
    ("direct", "off"),
    ("direct", "on"),
    ("direct", ONE_THREAD),
    ("router", "off"),
    ("router", "on"),
];

/// The one table: every load run, then each model's compute-ceiling points.
pub fn table(results: &Results) -> String {
    let mut out = String::new();
    out.push_str(
        "| model | path | batching | c | req/s | p50 ms | p90 ms | p99 ms | mean batch | router CPU µs/req | server CPU µs/req | client CPU µs/req | errors | other load (cores) |\n\
         | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for model in results.models() {
        for (path, batching) in PATHS {
            for c in results.concurrencies() {
                let Some(r) = results.load(&model, path, batching, c) else {
                    continue;
                };
                let cpu = |name: &str| r.watched_cpu.get(name).map(|u| u.us_per_request);
                let server_cpu = cpu("worker").or_else(|| cpu("server"));
                let path_label = match path {
                    "transport" => "transport ceiling",
                    other => other,
                };
                let errors: u64 = r.errors.values().sum();
                let _ = writeln!(
                    out,
                    "| {model} | {path_label} | {batching} | {c} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {errors} | {:.2} |",
                    rate(r.throughput_rps),
                    ms(r.latency.p50_us),
                    ms(r.latency.p90_us),
                    ms(r.latency.p99_us),
                    opt(
                        r.worker.as_ref().and_then(|w| w.mean_batch_rows),
                        |v| format!("{v:.1}")
                    ),
                    opt(cpu("router"), |v| format!("{v:.1}")),
                    opt(server_cpu, |v| format!("{v:.1}")),
                    r.generator_cpu.us_per_request,
                    r.other_cores,
                );
            }
        }
        let mut points: Vec<&ComputePoint> = results
            .computes
            .iter()
            .filter(|p| tag(&p.tags, "model") == model)
            .collect();
        points.sort_by_key(|p| p.batch);
        points.dedup_by_key(|p| p.batch);
        for p in points {
            let _ = writeln!(
                out,
                "| {model} | compute ceiling (in-process) | batch {} | – | {} | {} | – | {} | {} | – | – | – | – | {:.2} |",
                p.batch,
                rate(p.rows_per_s),
                ms(p.p50_us),
                ms(p.p99_us),
                p.batch,
                p.other_cores,
            );
        }
    }
    out
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A target, met.
    Met,
    /// A target, missed.
    Missed,
    /// A ratio the issue asks for, with no target.
    Reported,
    /// The runs it needs are not in the results.
    NotMeasured,
}

/// One target or ratio, with its numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What is checked.
    pub what: String,
    /// How it came out.
    pub verdict: Verdict,
    /// The numbers.
    pub detail: String,
}

impl Check {
    fn target(what: impl Into<String>, met: bool, detail: String) -> Self {
        Self {
            what: what.into(),
            verdict: if met { Verdict::Met } else { Verdict::Missed },
            detail,
        }
    }

    fn info(what: impl Into<String>, detail: String) -> Self {
        Self {
            what: what.into(),
            verdict: Verdict::Reported,
            detail,
        }
    }

    fn missing(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            verdict: Verdict::NotMeasured,
            detail: "the runs it needs are not in the results".to_string(),
        }
    }

    /// The check as a markdown list item: `- **met** — what: detail`.
    pub fn line(&self) -> String {
        let verdict = match self.verdict {
            Verdict::Met => "**met**",
            Verdict::Missed => "**missed**",
            Verdict::Reported => "reported",
            Verdict::NotMeasured => "not measured",
        };
        format!("- {verdict} — {}: {}", self.what, self.detail)
    }
}

fn pct(a: f64, b: f64) -> f64 {
    if b > 0.0 { 100.0 * a / b } else { 0.0 }
}

/// The targets and ratios, each with its numbers.
pub fn checks(results: &Results) -> Vec<Check> {
    let mut checks = Vec::new();

    // Whether something else ran on the machine during the runs.
    let others: Vec<f64> = results
        .loads
        .iter()
        .map(|r| r.other_cores)
        .chain(results.computes.iter().map(|p| p.other_cores))
        .collect();
    if !others.is_empty() {
        let busy = others.iter().filter(|o| **o >= NOISY_CORES).count();
        let max = others.iter().copied().fold(0.0, f64::max);
        checks.push(Check::info(
            "Other load on the machine during the runs",
            if busy == 0 {
                format!("none worth counting (at most {max:.2} cores besides the benchmark's processes)")
            } else {
                format!(
                    "{busy} of {} runs had ≥ {NOISY_CORES} cores busy with other work (at most {max:.2}); their rows are less reliable",
                    others.len()
                )
            },
        ));
    }

    // MNIST c=32 with batching: ≥ 70 % of the transport ceiling and ≥ 13,000/s.
    let what =
        "MNIST c=32, batching on, direct: ≥ 70% of the transport ceiling and ≥ 13,000 inferences/s";
    match (
        results.load(MNIST, "direct", "on", 32),
        results.load(MNIST, "transport", "-", 32),
    ) {
        (Some(on), Some(ceiling)) => {
            let share = pct(on.throughput_rps, ceiling.throughput_rps);
            checks.push(Check::target(
                what,
                share >= 70.0 && on.throughput_rps >= 13_000.0,
                format!(
                    "{} req/s = {share:.0}% of the transport ceiling's {} req/s",
                    rate(on.throughput_rps),
                    rate(ceiling.throughput_rps)
                ),
            ));
        }
        _ => checks.push(Check::missing(what)),
    }

    // MNIST c=1 batching on p50 ≤ 0.3 ms direct.
    let what = "MNIST c=1, batching on, direct: p50 ≤ 0.3 ms";
    match results.load(MNIST, "direct", "on", 1) {
        Some(r) => checks.push(Check::target(
            what,
            r.latency.p50_us <= 300.0,
            format!(
                "p50 {} ms (transport ceiling at c=1: {} ms)",
                ms(r.latency.p50_us),
                opt(
                    results
                        .load(MNIST, "transport", "-", 1)
                        .map(|t| t.latency.p50_us),
                    ms
                )
            ),
        )),
        None => checks.push(Check::missing(what)),
    }

    // ResNet-18 with batching ≥ 90 % of the compute ceiling at c = 1, 8, 32.
    for c in [1, 8, 32] {
        let what = format!("ResNet-18 c={c}, batching on, direct: ≥ 90% of the compute ceiling");
        match (
            results.load(RESNET, "direct", "on", c),
            results.compute_ceiling(RESNET, c),
        ) {
            (Some(r), Some((ceiling, how))) => {
                let share = pct(r.throughput_rps, ceiling);
                checks.push(Check::target(
                    what,
                    share >= 90.0,
                    format!(
                        "{} inferences/s = {share:.0}% of {} ({how})",
                        rate(r.throughput_rps),
                        rate(ceiling)
                    ),
                ));
            }
            _ => checks.push(Check::missing(what)),
        }
    }

    // Router hop: ≤ 150 µs extra p50 at c=1.
    let what = "Router hop at c=1 (MNIST, batching on): ≤ 150 µs extra p50";
    match (
        results.load(MNIST, "router", "on", 1),
        results.load(MNIST, "direct", "on", 1),
    ) {
        (Some(router), Some(direct)) => {
            let extra = router.latency.p50_us - direct.latency.p50_us;
            checks.push(Check::target(
                what,
                extra <= 150.0,
                format!(
                    "{extra:.0} µs (p50 {} ms through the router, {} ms direct)",
                    ms(router.latency.p50_us),
                    ms(direct.latency.p50_us)
                ),
            ));
        }
        _ => checks.push(Check::missing(what)),
    }

    // Router CPU ≤ 20 µs per request at c=32.
    let what = "Router CPU at c=32 (MNIST, batching on): ≤ 20 µs per request";
    match results
        .load(MNIST, "router", "on", 32)
        .and_then(|r| r.watched_cpu.get("router").map(|u| (r, u)))
    {
        Some((r, cpu)) => checks.push(Check::target(
            what,
            cpu.us_per_request <= 20.0,
            format!(
                "{:.1} µs/request ({:.2} CPU-s over {} requests; the router kept {:.2} cores busy)",
                cpu.us_per_request, cpu.cpu_s, r.requests, cpu.cores
            ),
        )),
        None => checks.push(Check::missing(what)),
    }

    // Router/direct throughput, both models (ResNet ≥ 95 %).
    for model in [MNIST, RESNET] {
        let ratios: Vec<(usize, f64)> = results
            .concurrencies()
            .into_iter()
            .filter_map(|c| {
                let router = results.load(model, "router", "on", c)?;
                let direct = results.load(model, "direct", "on", c)?;
                Some((c, pct(router.throughput_rps, direct.throughput_rps)))
            })
            .collect();
        let detail = ratios
            .iter()
            .map(|(c, p)| format!("c={c}: {p:.0}%"))
            .collect::<Vec<_>>()
            .join(", ");
        if ratios.is_empty() {
            checks.push(Check::missing(format!(
                "{model}: router/direct throughput (batching on)"
            )));
        } else if model == RESNET {
            checks.push(Check::target(
                "ResNet-18: router/direct throughput ≥ 95% (batching on, every c)",
                ratios.iter().all(|(_, p)| *p >= 95.0),
                detail,
            ));
        } else {
            checks.push(Check::info(
                "MNIST: router/direct throughput (batching on)",
                detail,
            ));
        }
    }

    // Batching on vs off at c=32 on MNIST.
    for path in ["direct", "router"] {
        let what = format!("MNIST c=32, {path}: batching on vs off");
        match (
            results.load(MNIST, path, "on", 32),
            results.load(MNIST, path, "off", 32),
        ) {
            (Some(on), Some(off)) => checks.push(Check::info(
                what,
                format!(
                    "{} vs {} req/s (×{:.2}); p50 {} vs {} ms",
                    rate(on.throughput_rps),
                    rate(off.throughput_rps),
                    on.throughput_rps / off.throughput_rps.max(1e-9),
                    ms(on.latency.p50_us),
                    ms(off.latency.p50_us)
                ),
            )),
            _ => checks.push(Check::missing(what)),
        }
    }

    // The default pool (a batch thread per CPU, one intra-op thread each) against one
    // batch thread with every CPU in each forward pass.
    for model in results.models() {
        let what = format!("{model}, direct, batching on: default batch threads vs 1 batch thread");
        let pairs: Vec<String> = results
            .concurrencies()
            .into_iter()
            .filter_map(|c| {
                let default = results.load(&model, "direct", "on", c)?;
                let one = results.load(&model, "direct", ONE_THREAD, c)?;
                Some(format!(
                    "c={c}: {} vs {} req/s, p50 {} vs {} ms",
                    rate(default.throughput_rps),
                    rate(one.throughput_rps),
                    ms(default.latency.p50_us),
                    ms(one.latency.p50_us)
                ))
            })
            .collect();
        if !pairs.is_empty() {
            checks.push(Check::info(what, pairs.join("; ")));
        }
    }

    // Where a request's time goes in the worker, against the forward pass alone.
    for model in results.models() {
        let what = format!("{model} c=32, batching on, direct: time in the worker (metrics)");
        let Some(r) = results.load(&model, "direct", "on", 32) else {
            continue;
        };
        let Some(w) = r.worker.as_ref() else {
            continue;
        };
        let raw = w
            .mean_batch_rows
            .and_then(|m| results.compute(&model, (m.round() as usize).max(1)))
            .map(|p| format!(" (the same batch in-process: {:.0} µs)", p.mean_us))
            .unwrap_or_default();
        checks.push(Check::info(
            what,
            format!(
                "queue wait {} µs, forward pass {} µs for {} rows{raw}, whole call in the service {} µs; the client saw {:.0} µs",
                opt(w.mean_queue_wait_us, |v| format!("{v:.0}")),
                opt(w.mean_forward_pass_us, |v| format!("{v:.0}")),
                opt(w.mean_batch_rows, |v| format!("{v:.1}")),
                opt(w.mean_request_us, |v| format!("{v:.0}")),
                r.latency.mean_us
            ),
        ));
    }

    // Batch sizes the batcher formed.
    for model in results.models() {
        let formed: Vec<String> = results
            .concurrencies()
            .into_iter()
            .filter_map(|c| {
                let w = results.load(&model, "direct", "on", c)?.worker.as_ref()?;
                let hist = w
                    .batch_rows_histogram
                    .iter()
                    .map(|(le, n)| format!("≤{le}: {n:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                Some(format!(
                    "c={c}: mean {} ({hist})",
                    opt(w.mean_batch_rows, |v| format!("{v:.1}"))
                ))
            })
            .collect();
        let what = format!("{model}: batch sizes formed (direct, batching on; worker metrics)");
        if formed.is_empty() {
            checks.push(Check::info(
                what,
                "the worker exported no batch metrics; the compute ceiling's sweep shows what each size would give"
                    .to_string(),
            ));
        } else {
            checks.push(Check::info(what, formed.join("; ")));
        }
    }
    checks
}

/// The whole generated section: facts about the run (`meta`: name, value), the table and
/// the checks.
pub fn render(results: &Results, meta: &[(String, String)]) -> String {
    let mut out = String::new();
    for (name, value) in meta {
        let _ = writeln!(out, "- {name}: {value}");
    }
    out.push('\n');
    out.push_str(&table(results));
    out.push_str("\n### Targets and ratios (all from the run above)\n\n");
    for check in checks(results) {
        out.push_str(&check.line());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::load::{CpuUse, Latency};
    use crate::worker_metrics::WorkerView;

    fn load(model: &str, path: &str, batching: &str, c: usize, rps: f64, p50: f64) -> LoadReport {
        LoadReport {
            tags: BTreeMap::from([
                ("model".to_string(), model.to_string()),
                ("path".to_string(), path.to_string()),
                ("batching".to_string(), batching.to_string()),
            ]),
            server: "127.0.0.1:1".into(),
            concurrency: c,
            connections: 1,
            request_bytes: 3000,
            requests: (rps * 5.0) as u64,
            errors: BTreeMap::new(),
            warmup_s: 1.0,
            duration_s: 5.0,
            throughput_rps: rps,
            latency: Latency {
                p50_us: p50,
                p90_us: p50 * 1.2,
                p99_us: p50 * 2.0,
                ..Latency::default()
            },
            generator_cpu: CpuUse {
                pid: 1,
                cpu_s: 1.0,
                us_per_request: 10.0,
                cores: 0.2,
            },
            watched_cpu: BTreeMap::new(),
            other_cores: 0.0,
            worker: None,
            outputs: vec![("scores".into(), 10)],
        }
    }

    fn compute(model: &str, batch: usize, rows_per_s: f64) -> ComputePoint {
        ComputePoint {
            tags: BTreeMap::from([("model".to_string(), model.to_string())]),
            batch,
            calls: 10,
            mean_us: 1000.0,
            p50_us: 1000.0,
            p99_us: 1200.0,
            rows_per_s,
            intra_op_threads: 2,
            other_cores: 0.0,
        }
    }

    fn sample() -> Results {
        let mut router = load(MNIST, "router", "on", 32, 14_000.0, 2000.0);
        router.watched_cpu.insert(
            "router".into(),
            CpuUse {
                pid: 7,
                cpu_s: 1.4,
                us_per_request: 20.0,
                cores: 0.28,
            },
        );
        let mut mnist32 = load(MNIST, "direct", "on", 32, 15_000.0, 1900.0);
        mnist32.worker = Some(WorkerView {
            mean_batch_rows: Some(8.4),
            mean_forward_pass_us: Some(650.0),
            mean_queue_wait_us: Some(190.0),
            mean_request_us: Some(1200.0),
            ..WorkerView::default()
        });
        let mut resnet8 = load(RESNET, "direct", "on", 8, 50.0, 150_000.0);
        resnet8.worker = Some(WorkerView {
            mean_batch_rows: Some(7.6),
            ..WorkerView::default()
        });
        Results {
            loads: vec![
                load(MNIST, "transport", "-", 32, 20_000.0, 1500.0),
                load(MNIST, "transport", "-", 1, 6000.0, 150.0),
                mnist32,
                load(MNIST, "direct", "off", 32, 9_000.0, 3000.0),
                load(MNIST, "direct", "on", 1, 4000.0, 250.0),
                load(MNIST, "router", "on", 1, 3000.0, 420.0),
                router,
                load(RESNET, "direct", "on", 1, 30.0, 33_000.0),
                resnet8,
                load(RESNET, "router", "on", 8, 49.0, 151_000.0),
                load(RESNET, "direct", "on", 32, 40.0, 800_000.0),
            ],
            computes: vec![
                compute(RESNET, 1, 32.0),
                compute(RESNET, 8, 60.0),
                compute(RESNET, 16, 62.0),
                compute(RESNET, 32, 44.0),
                compute(MNIST, 1, 50_000.0),
                compute(MNIST, 8, 300_000.0),
            ],
        }
    }

    fn find<'a>(checks: &'a [Check], what: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.what.contains(what))
            .unwrap_or_else(|| panic!("no check about {what}: {checks:#?}"))
    }

    #[test]
    fn targets_are_judged_on_the_numbers() {
        let checks = checks(&sample());
        let c32 = find(&checks, "MNIST c=32, batching on, direct");
        assert_eq!(c32.verdict, Verdict::Met, "{c32:?}");
        assert!(c32.detail.contains("75%"), "{}", c32.detail);
        assert_eq!(find(&checks, "p50 ≤ 0.3 ms").verdict, Verdict::Met);
        let hop = find(&checks, "Router hop");
        assert_eq!(hop.verdict, Verdict::Missed);
        assert!(hop.detail.starts_with("170 µs"), "{}", hop.detail);
        assert_eq!(find(&checks, "Router CPU").verdict, Verdict::Met);
        // c=1: 30 of 32 (94%); c=8: the batcher formed 7.6 → batch 8: 50 of 60 (83%);
        // c=32: no worker metrics → the best batch ≤ 32 (16: 62/s): 40 of 62.
        assert_eq!(find(&checks, "ResNet-18 c=1,").verdict, Verdict::Met);
        let c8 = find(&checks, "ResNet-18 c=8,");
        assert_eq!(c8.verdict, Verdict::Missed);
        assert!(c8.detail.contains("batcher's mean of 7.6"), "{}", c8.detail);
        assert!(find(&checks, "ResNet-18 c=32,").detail.contains("batch 16"));
        let ratio = find(&checks, "ResNet-18: router/direct");
        assert_eq!(ratio.verdict, Verdict::Met);
        assert_eq!(ratio.detail, "c=8: 98%");
        let time = find(
            &checks,
            "mnist c=32, batching on, direct: time in the worker",
        );
        assert_eq!(
            time.detail,
            "queue wait 190 µs, forward pass 650 µs for 8.4 rows (the same batch in-process: \
             1000 µs), whole call in the service 1200 µs; the client saw 0 µs"
        );
        let onoff = find(&checks, "MNIST c=32, direct: batching on vs off");
        assert!(onoff.detail.contains("×1.67"), "{}", onoff.detail);
        assert_eq!(
            find(&checks, "MNIST c=32, router: batching").verdict,
            Verdict::NotMeasured
        );
        assert_eq!(
            find(&checks, "MNIST c=32, direct: batching").verdict,
            Verdict::Reported
        );
    }

    #[test]
    fn disturbed_runs_are_counted() {
        let mut results = sample();
        assert!(
            find(&checks(&results), "Other load")
                .detail
                .starts_with("none")
        );
        results.computes[0].other_cores = 0.9;
        let noise = find(&checks(&results), "Other load").detail.clone();
        assert!(noise.starts_with("1 of 17 runs"), "{noise}");
    }

    #[test]
    fn the_table_has_a_row_per_run_and_per_batch_size() {
        let results = sample();
        let table = table(&results);
        let rows = table.lines().count() - 2;
        assert_eq!(rows, results.loads.len() + results.computes.len());
        assert!(
            table.contains("| mnist | transport ceiling | - | 1 | 6000 | 0.150 |"),
            "{table}"
        );
        assert!(
            table.contains("| resnet18 | direct | on | 8 | 50.0 | 150.0 |"),
            "{table}"
        );
        assert!(
            table.contains("| resnet18 | compute ceiling (in-process) | batch 16 | – | 62.0 |")
        );
        // Transport first, then direct off/on, router off/on, then compute.
        let first_direct = table.find("| mnist | direct |").unwrap();
        assert!(table.find("| mnist | transport").unwrap() < first_direct);
    }

    #[test]
    fn batch_sizes_include_what_the_batcher_formed() {
        let results = sample();
        assert_eq!(
            results.batch_sizes_to_measure(RESNET, &[1, 2, 4, 16]),
            vec![1, 2, 4, 8, 16]
        );
    }

    #[test]
    fn results_round_trip_through_json_lines() {
        let results = sample();
        let mut text = String::new();
        for r in &results.loads {
            let record = Record::Load(Box::new(r.clone()));
            text.push_str(&serde_json::to_string(&record).unwrap());
            text.push('\n');
        }
        text.push('\n');
        for p in &results.computes {
            let record = Record::Compute(p.clone());
            text.push_str(&serde_json::to_string(&record).unwrap());
            text.push('\n');
        }
        assert_eq!(Results::parse(&text).unwrap(), results);
        let err = Results::parse("{\"kind\":\"load\"}").unwrap_err();
        assert!(err.to_string().contains("results line 1"), "{err}");
    }

    #[test]
    fn render_starts_with_the_facts() {
        let text = render(&sample(), &[("commit".into(), "abc1234".into())]);
        assert!(text.starts_with("- commit: abc1234\n\n| model |"), "{text}");
        assert!(text.contains("**missed**"));
    }
}
