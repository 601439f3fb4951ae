//! The compute ceiling: the model's forward pass in this process, with no RPC, no queue
//! and no copies in or out: `CModule::load`, eval mode, `no_grad`, LibTorch's threads set
//! as the worker sets them by default (intra-op and inter-op = the CPUs this process may
//! use), warmed up at each batch size before it is timed (TorchScript's profiling executor
//! re-optimizes for each new input shape during its first calls).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Once;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tch::{CModule, Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::proc_stat;
use crate::request::random_f32_bytes;

/// What to measure.
#[derive(Debug, Clone)]
pub struct ComputeConfig {
    /// The version directory holding `model.pt`.
    pub model_dir: PathBuf,
    /// The shape of one request's input, batch dimension first (e.g. `[1, 784]`); each
    /// batch size replaces dimension 0.
    pub shape: Vec<i64>,
    /// Batch sizes to time, in order.
    pub batch_sizes: Vec<usize>,
    /// Warm-up per batch size: at least `min_calls` calls and this long.
    pub warmup: Duration,
    /// Timed window per batch size: at least `min_calls` calls and this long.
    pub duration: Duration,
    /// Fewest calls in a warm-up and in a timed window.
    pub min_calls: u32,
    /// LibTorch intra-op threads; `None`: the CPUs this process may use (the worker's default).
    pub intra_op_threads: Option<usize>,
    /// Free-form labels copied into each point (the model's name).
    pub tags: BTreeMap<String, String>,
}

/// One batch size's forward passes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputePoint {
    /// The labels given with `--tag` (the model's name).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Rows per forward pass.
    pub batch: usize,
    /// Timed forward passes.
    pub calls: u64,
    /// Mean time of one forward pass, µs.
    pub mean_us: f64,
    /// Median time of one forward pass, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Rows (inferences) per second: `batch * calls / time`.
    pub rows_per_s: f64,
    /// LibTorch intra-op threads used.
    pub intra_op_threads: usize,
    /// Cores kept busy by everything else on the machine while this size was timed (all
    /// CPU time less this process's); see [`crate::load::LoadReport::other_cores`].
    #[serde(default)]
    pub other_cores: f64,
}

/// Sets LibTorch's intra-op threads, and its inter-op threads once per process (LibTorch
/// refuses to resize that pool once it has run).
fn configure_threads(intra_op: usize, inter_op: usize) {
    static ONCE: Once = Once::new();
    let clamp = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    ONCE.call_once(|| {
        let inter = clamp(inter_op);
        if std::panic::catch_unwind(|| tch::set_num_interop_threads(inter)).is_err() {
            eprintln!("aspire-bench: LibTorch's inter-op pool was already in use; its size stays");
        }
    });
    tch::set_num_threads(clamp(intra_op));
}

fn torch(e: tch::TchError) -> Error {
    Error::Torch(e.to_string())
}

/// Loads the model and times its forward pass at each batch size.
pub fn run_compute(config: &ComputeConfig) -> Result<Vec<ComputePoint>> {
    if config.batch_sizes.is_empty() || config.batch_sizes.contains(&0) {
        return Err(Error::InvalidOption(
            "--batch-sizes needs at least one size, each at least 1".to_string(),
        ));
    }
    if config.shape.is_empty() {
        return Err(Error::InvalidOption("--shape is empty".to_string()));
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = config.intra_op_threads.unwrap_or(cpus).max(1);
    configure_threads(threads, cpus);

    let path = config.model_dir.join("model.pt");
    let mut module = CModule::load_on_device(&path, Device::Cpu)
        .map_err(|e| Error::Torch(format!("cannot load {}: {e}", path.display())))?;
    module.f_set_eval().map_err(torch)?;

    let mut points = Vec::with_capacity(config.batch_sizes.len());
    for &batch in &config.batch_sizes {
        let mut shape = config.shape.clone();
        shape[0] = i64::try_from(batch)
            .map_err(|_| Error::InvalidOption(format!("batch size {batch} is too large")))?;
        let numel: usize = shape
            .iter()
            .map(|d| usize::try_from(*d).unwrap_or(0))
            .product();
        let data = random_f32_bytes(numel, batch as u64);
        let input = Tensor::f_from_data_size(&data, &shape, Kind::Float).map_err(torch)?;
        let forward = || -> Result<()> {
            let _output = tch::no_grad(|| module.forward_ts(&[&input])).map_err(torch)?;
            Ok(())
        };
        let warm_start = Instant::now();
        let mut warm_calls = 0;
        while warm_calls < config.min_calls || warm_start.elapsed() < config.warmup {
            forward()?;
            warm_calls += 1;
        }
        let mut histogram =
            Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds");
        let machine_before = proc_stat::machine_busy().unwrap_or_default();
        let own_before = proc_stat::cpu_time(None).unwrap_or_default();
        let start = Instant::now();
        let mut calls: u64 = 0;
        while calls < u64::from(config.min_calls) || start.elapsed() < config.duration {
            let t = Instant::now();
            forward()?;
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            histogram.saturating_record(ns.max(1));
            calls += 1;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let machine = proc_stat::machine_busy()
            .unwrap_or_default()
            .saturating_sub(machine_before);
        let own = proc_stat::cpu_time(None)
            .unwrap_or_default()
            .saturating_sub(own_before);
        let other_cores = (machine.saturating_sub(own).as_secs_f64() / elapsed.max(1e-9)).max(0.0);
        points.push(ComputePoint {
            tags: config.tags.clone(),
            batch,
            calls,
            mean_us: histogram.mean() / 1e3,
            p50_us: histogram.value_at_quantile(0.5) as f64 / 1e3,
            p99_us: histogram.value_at_quantile(0.99) as f64 / 1e3,
            rows_per_s: (batch as u64 * calls) as f64 / elapsed,
            intra_op_threads: threads,
            other_cores,
        });
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_a_traced_model_at_each_batch_size() {
        let dir = tempfile::tempdir().unwrap();
        // A small linear model made with tch itself: y = x W^T + b, 8 -> 3.
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let linear = tch::nn::linear(vs.root(), 8, 3, Default::default());
        let mut vs = vs;
        vs.freeze();
        let mut closure = |inputs: &[Tensor]| vec![inputs[0].apply(&linear)];
        let module = CModule::create_by_tracing(
            "Linear",
            "forward",
            &[Tensor::zeros([1, 8], (Kind::Float, Device::Cpu))],
            &mut closure,
        )
        .unwrap();
        module.save(dir.path().join("model.pt")).unwrap();
        let config = ComputeConfig {
            model_dir: dir.path().to_path_buf(),
            shape: vec![1, 8],
            batch_sizes: vec![1, 4],
            warmup: Duration::ZERO,
            duration: Duration::from_millis(20),
            min_calls: 3,
            intra_op_threads: Some(1),
            tags: BTreeMap::new(),
        };
        let points = run_compute(&config).unwrap();
        assert_eq!(
            points.iter().map(|p| p.batch).collect::<Vec<_>>(),
            vec![1, 4]
        );
        for p in &points {
            assert!(
                p.calls >= 3 && p.rows_per_s > 0.0 && p.mean_us > 0.0,
                "{p:?}"
            );
            assert_eq!(p.intra_op_threads, 1);
        }
    }

    #[test]
    fn a_missing_model_is_a_sentence() {
        let dir = tempfile::tempdir().unwrap();
        let config = ComputeConfig {
            model_dir: dir.path().to_path_buf(),
            shape: vec![1, 8],
            batch_sizes: vec![1],
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
            min_calls: 1,
            intra_op_threads: Some(1),
            tags: BTreeMap::new(),
        };
        let err = run_compute(&config).unwrap_err().to_string();
        assert!(err.contains("cannot load"), "{err}");
        let bad = ComputeConfig {
            batch_sizes: vec![0],
            ..config
        };
        assert!(run_compute(&bad).is_err());
    }
}
