//! Flags shared by every process that runs a worker (`aspire-server`, `aspire-worker`):
//! batching, device and LibTorch threads, in TensorFlow Serving's spellings where it has
//! them. Each is accepted in snake_case and kebab-case and falls back to an environment
//! variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, ValueEnum};

use crate::batcher::BatchConfig;
use crate::codec::OutputEncoding;
use crate::model::DeviceSpec;
use crate::storage_roots::StorageRoots;
use aspire_ingress::{
    DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
};

/// Batching flags. A flag given on the command line overrides the same knob in
/// `--batching_parameters_file`, which overrides the default.
#[derive(Debug, Clone, Args)]
pub struct BatchingArgs {
    /// Batch concurrent requests of one model version into one forward pass.
    #[arg(long = "enable_batching", visible_alias = "enable-batching", env = "ASPIRE_ENABLE_BATCHING",
          num_args = 0..=1, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub enable_batching: bool,
    /// TensorFlow Serving's text-format BatchingParameters file.
    #[arg(
        long = "batching_parameters_file",
        visible_alias = "batching-parameters-file",
        env = "ASPIRE_BATCHING_PARAMETERS_FILE"
    )]
    pub batching_parameters_file: Option<PathBuf>,
    /// Most rows in one forward pass [default: 32, or the last allowed batch size].
    #[arg(
        long = "max-batch-size",
        visible_alias = "max_batch_size",
        env = "ASPIRE_MAX_BATCH_SIZE"
    )]
    pub max_batch_size: Option<usize>,
    /// How long a partial batch waits for more requests, in µs [default: 0: run at once].
    #[arg(
        long = "batch-timeout-micros",
        visible_alias = "batch_timeout_micros",
        env = "ASPIRE_BATCH_TIMEOUT_MICROS"
    )]
    pub batch_timeout_micros: Option<u64>,
    /// Queue capacity per version, in batches [default: 100].
    #[arg(
        long = "max-enqueued-batches",
        visible_alias = "max_enqueued_batches",
        env = "ASPIRE_MAX_ENQUEUED_BATCHES"
    )]
    pub max_enqueued_batches: Option<usize>,
    /// Queue capacity per version in bytes of input tensors, whatever their rows; a
    /// request that would pass it is shed with RESOURCE_EXHAUSTED [default: 512 MiB].
    #[arg(
        long = "max-enqueued-bytes",
        visible_alias = "max_enqueued_bytes",
        env = "ASPIRE_MAX_ENQUEUED_BYTES"
    )]
    pub max_enqueued_bytes: Option<usize>,
    /// Threads running forward passes, shared by every model version of the worker, as in
    /// TensorFlow Serving [default: the CPUs this process may use].
    #[arg(
        long = "num-batch-threads",
        visible_alias = "num_batch_threads",
        env = "ASPIRE_NUM_BATCH_THREADS"
    )]
    pub num_batch_threads: Option<usize>,
    /// Batch sizes to pad batches to, ascending, comma-separated; the last is the maximum.
    #[arg(
        long = "allowed-batch-sizes",
        visible_alias = "allowed_batch_sizes",
        env = "ASPIRE_ALLOWED_BATCH_SIZES",
        value_delimiter = ','
    )]
    pub allowed_batch_sizes: Option<Vec<usize>>,
}

/// Largest request accepted when batching is off: requests then run alone, so the only
/// limit is memory; this bounds a single request's rows.
const UNBATCHED_MAX_ROWS: usize = 1 << 20;

/// Default of `--max-enqueued-bytes`.
pub const DEFAULT_MAX_ENQUEUED_BYTES: usize = 512 << 20;

impl BatchingArgs {
    /// The batch configuration these flags (and the parameters file) describe. Errors
    /// name the flag or file field.
    pub fn resolve(&self) -> Result<BatchConfig, String> {
        let mut file = aspire_proto::serving::BatchingParameters::default();
        if let Some(path) = &self.batching_parameters_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--batching_parameters_file {}: {e}", path.display()))?;
            file = aspire_proto::parse_text_format("tensorflow.serving.BatchingParameters", &text)
                .map_err(|e| format!("--batching_parameters_file {}: {e}", path.display()))?;
            if file.pad_variable_length_inputs {
                tracing::warn!(
                    "pad_variable_length_inputs is not supported: only requests whose dimensions past the first match share a batch"
                );
            }
        }
        let positive = |name: &str, v: Option<i64>| -> Result<Option<usize>, String> {
            v.map(|v| {
                usize::try_from(v)
                    .ok()
                    .filter(|v| *v > 0)
                    .ok_or_else(|| format!("{name} must be positive, got {v}"))
            })
            .transpose()
        };
        let allowed: Vec<usize> = match &self.allowed_batch_sizes {
            Some(list) => list.clone(),
            None => file
                .allowed_batch_sizes
                .iter()
                .map(|v| positive("allowed_batch_sizes", Some(*v)).map(|v| v.unwrap_or(0)))
                .collect::<Result<_, _>>()?,
        };
        if allowed.contains(&0) || allowed.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!(
                "allowed batch sizes {allowed:?} must be positive and strictly ascending"
            ));
        }
        let max = self
            .max_batch_size
            .or(positive("max_batch_size", file.max_batch_size)?)
            .or(allowed.last().copied())
            .unwrap_or(32);
        if max == 0 {
            return Err("--max-batch-size must be positive".into());
        }
        if let Some(last) = allowed.last().filter(|last| **last != max) {
            return Err(format!(
                "the last allowed batch size ({last}) must equal the max batch size ({max})"
            ));
        }
        let timeout_us = match self.batch_timeout_micros {
            Some(v) => v,
            None => u64::try_from(file.batch_timeout_micros.unwrap_or(0))
                .map_err(|_| "batch_timeout_micros must not be negative".to_string())?,
        };
        let enqueued = self
            .max_enqueued_batches
            .or(positive("max_enqueued_batches", file.max_enqueued_batches)?)
            .unwrap_or(100);
        let threads = self
            .num_batch_threads
            .or(positive("num_batch_threads", file.num_batch_threads)?)
            .unwrap_or_else(available_cpus);
        if enqueued == 0 || threads == 0 {
            return Err("--max-enqueued-batches and --num-batch-threads must be positive".into());
        }
        let enqueued_bytes = self
            .max_enqueued_bytes
            .unwrap_or(DEFAULT_MAX_ENQUEUED_BYTES);
        if enqueued_bytes == 0 {
            return Err("--max-enqueued-bytes must be positive".into());
        }
        Ok(if self.enable_batching {
            BatchConfig {
                enabled: true,
                max_batch_size: max,
                batch_timeout: Duration::from_micros(timeout_us),
                max_enqueued_batches: enqueued,
                max_enqueued_bytes: enqueued_bytes,
                num_batch_threads: threads,
                allowed_batch_sizes: allowed,
            }
        } else {
            BatchConfig {
                enabled: false,
                max_batch_size: UNBATCHED_MAX_ROWS,
                batch_timeout: Duration::ZERO,
                // Counted in rows of UNBATCHED_MAX_ROWS: a queue of 1 such batch.
                max_enqueued_batches: 1,
                max_enqueued_bytes: enqueued_bytes,
                num_batch_threads: threads,
                allowed_batch_sizes: Vec::new(),
            }
        })
    }
}

/// The batch sizes a version is warmed up at before it is AVAILABLE: the allowed sizes,
/// else powers of two up to the maximum and the maximum (TorchScript's executor
/// re-optimizes for each new input shape, so the first requests at an unseen size are slow).
pub fn warmup_batch_sizes(config: &BatchConfig) -> Vec<usize> {
    if !config.enabled {
        return vec![1];
    }
    if !config.allowed_batch_sizes.is_empty() {
        return config.allowed_batch_sizes.clone();
    }
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |s| s.checked_mul(2))
        .take_while(|s| *s < config.max_batch_size)
        .collect();
    sizes.push(config.max_batch_size);
    sizes
}

/// Device and LibTorch thread flags.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Where models run: auto (CUDA when LibTorch sees a GPU), cpu, cuda or cuda:N.
    #[arg(long, env = "ASPIRE_DEVICE", default_value = "auto")]
    pub device: DeviceSpec,
    /// LibTorch intra-op threads per batch thread; 0 shares the CPUs this process may use
    /// among the batch threads (CPUs / --num-batch-threads, at least 1), so that the
    /// forward passes running at once never ask for more threads than there are CPUs.
    #[arg(
        long = "tensorflow_intra_op_parallelism",
        visible_alias = "tensorflow-intra-op-parallelism",
        env = "ASPIRE_INTRA_OP_THREADS",
        default_value_t = 0
    )]
    pub intra_op_threads: usize,
    /// LibTorch inter-op threads; 0 sizes them to the CPUs this process may use.
    #[arg(
        long = "tensorflow_inter_op_parallelism",
        visible_alias = "tensorflow-inter-op-parallelism",
        env = "ASPIRE_INTER_OP_THREADS",
        default_value_t = 0
    )]
    pub inter_op_threads: usize,
}

impl RuntimeArgs {
    /// LibTorch intra-op threads for a pool of `batch_threads` batch threads: the flag
    /// when given, else the CPUs shared among the batch threads (at least 1 each).
    pub fn intra_op_threads_for(&self, batch_threads: usize) -> usize {
        if self.intra_op_threads > 0 {
            self.intra_op_threads
        } else {
            (available_cpus() / batch_threads.max(1)).max(1)
        }
    }
}

/// How Predict answers encode outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EncodingArg {
    /// Typed repeated fields (`float_val`, ...), as TensorFlow Serving answers.
    Typed,
    /// Little-endian bytes in `tensor_content`: cheaper for large outputs.
    TensorContent,
}

impl From<EncodingArg> for OutputEncoding {
    fn from(e: EncodingArg) -> Self {
        match e {
            EncodingArg::Typed => OutputEncoding::Typed,
            EncodingArg::TensorContent => OutputEncoding::TensorContent,
        }
    }
}

/// How the gRPC API is served.
#[derive(Debug, Clone, Args)]
pub struct ServingArgs {
    /// Worker threads of the async runtime that serves gRPC [default: the CPUs this
    /// process may use].
    #[arg(
        long = "runtime-worker-threads",
        visible_alias = "runtime_worker_threads",
        env = "ASPIRE_RUNTIME_WORKER_THREADS"
    )]
    pub runtime_worker_threads: Option<usize>,
    /// Largest gRPC message accepted or sent, in bytes; a larger request is refused with
    /// INVALID_ARGUMENT from its header, before its body is read.
    #[arg(long = "max-message-size-bytes", visible_alias = "max_message_size_bytes", env = "ASPIRE_MAX_MESSAGE_SIZE_BYTES",
          default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_size_bytes: usize,
    /// Most bytes one request's inputs may take once decoded (a single value broadcast
    /// to a shape counts at the size it fills); a larger request is refused with
    /// INVALID_ARGUMENT before anything is allocated for it.
    #[arg(long = "max-request-bytes", visible_alias = "max_request_bytes", env = "ASPIRE_MAX_REQUEST_BYTES",
          default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// Request bytes the worker holds at once (messages as they arrive, plus decoded
    /// copies of typed values) until answered; a request that does not fit is shed at
    /// once with RESOURCE_EXHAUSTED.
    #[arg(long = "max-inflight-bytes", visible_alias = "max_inflight_bytes", env = "ASPIRE_MAX_INFLIGHT_BYTES",
          default_value_t = DEFAULT_MAX_INFLIGHT_BYTES)]
    pub max_inflight_bytes: usize,
    /// Requests one HTTP/2 connection may have open at once; a client's further
    /// requests wait for a stream to finish.
    #[arg(long = "max-concurrent-streams", visible_alias = "max_concurrent_streams", env = "ASPIRE_MAX_CONCURRENT_STREAMS",
          default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,
    /// How Predict answers encode outputs.
    #[arg(long = "output-encoding", visible_alias = "output_encoding", env = "ASPIRE_OUTPUT_ENCODING", value_enum,
          default_value_t = EncodingArg::Typed)]
    pub output_encoding: EncodingArg,
    /// Local directory model versions are copied into before loading [default: a new
    /// directory under the system's temp dir].
    #[arg(
        long = "cache-dir",
        visible_alias = "cache_dir",
        env = "ASPIRE_CACHE_DIR"
    )]
    pub cache_dir: Option<PathBuf>,
    /// TensorFlow Serving's SSL config file (text-format `SSLConfig`: `server_key`,
    /// `server_cert`, `custom_ca` as PEM text, `client_verify`); given, gRPC is served
    /// over TLS only, and the file is re-read when it changes [default: plaintext].
    #[arg(
        long = "ssl-config-file",
        visible_alias = "ssl_config_file",
        env = "ASPIRE_SSL_CONFIG_FILE"
    )]
    pub ssl_config_file: Option<PathBuf>,
    /// After an unloading version's grace, how long it waits for its requests in flight;
    /// then those still queued or running on it are answered at once with a retryable
    /// error (UNAVAILABLE; a router sends them again elsewhere) and the version is
    /// dropped, its memory freed when its last forward pass returns.
    #[arg(long = "unload-drain-seconds", visible_alias = "unload_drain_seconds", env = "ASPIRE_UNLOAD_DRAIN_SECONDS",
          default_value_t = DEFAULT_UNLOAD_DRAIN_SECONDS)]
    pub unload_drain_seconds: u64,
    /// A forward pass running longer than this is reported as slow, while it runs: in
    /// the metrics (aspire_worker_slow_passes_total, aspire_worker_slow_passes_running)
    /// and in the worker's registry record (`aspirectl status`); 0 turns this off.
    #[arg(long = "slow-pass-seconds", visible_alias = "slow_pass_seconds", env = "ASPIRE_SLOW_PASS_SECONDS",
          default_value_t = DEFAULT_SLOW_PASS_SECONDS)]
    pub slow_pass_seconds: u64,
}

/// `--unload-drain-seconds` when not given.
pub const DEFAULT_UNLOAD_DRAIN_SECONDS: u64 = 30;

/// `--slow-pass-seconds` when not given.
pub const DEFAULT_SLOW_PASS_SECONDS: u64 = 10;

impl ServingArgs {
    /// Checks the limits clap cannot; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_request_bytes == 0 {
            return Err("--max-request-bytes must be positive".into());
        }
        aspire_ingress::check_limits(
            self.max_message_size_bytes,
            self.max_inflight_bytes,
            self.max_concurrent_streams,
        )
    }

    /// `--unload-drain-seconds`.
    pub fn unload_drain(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.unload_drain_seconds)
    }

    /// `--slow-pass-seconds` (zero: off).
    pub fn slow_pass(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.slow_pass_seconds)
    }

    /// Threads for the async runtime.
    pub fn runtime_threads(&self) -> usize {
        self.runtime_worker_threads
            .unwrap_or_else(available_cpus)
            .max(1)
    }
}

/// Where model versions may be loaded from.
#[derive(Debug, Clone, Args)]
pub struct StorageArgs {
    /// A directory, file:// URL or bucket URL (s3://bucket/prefix, gs://, az://, abfs://)
    /// that model versions may be loaded from; repeat the flag or separate roots with
    /// commas. A version whose location (from the registry) is not under one is refused.
    /// aspire-worker needs at least one; aspire-server adds its model base paths.
    #[arg(
        long = "storage-root",
        visible_alias = "storage_root",
        env = "ASPIRE_STORAGE_ROOTS",
        value_delimiter = ','
    )]
    pub storage_roots: Vec<String>,
}

impl StorageArgs {
    /// The roots these flags name; the error names the flag.
    pub fn resolve(&self) -> Result<StorageRoots, String> {
        StorageRoots::parse(&self.storage_roots, "--storage-root")
    }
}

/// CPUs this process may use (honours affinity and cgroup quotas).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        batching: BatchingArgs,
    }

    fn parse(args: &[&str]) -> Result<BatchConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.batching.resolve()
    }

    #[test]
    fn flags_override_the_parameters_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("batching.txt");
        std::fs::write(
            &file,
            "max_batch_size { value: 64 }\nbatch_timeout_micros { value: 500 }\nnum_batch_threads { value: 3 }\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = parse(&["--enable_batching", "--batching_parameters_file", f]).unwrap();
        assert_eq!(
            (c.max_batch_size, c.batch_timeout, c.num_batch_threads),
            (64, Duration::from_micros(500), 3)
        );
        let c = parse(&[
            "--enable_batching=true",
            &format!("--batching_parameters_file={f}"),
            "--max-batch-size=8",
            "--batch_timeout_micros=0",
        ])
        .unwrap();
        assert_eq!((c.max_batch_size, c.batch_timeout), (8, Duration::ZERO));
        let c = parse(&["--enable-batching=false"]).unwrap();
        assert!(!c.enabled);
    }

    #[test]
    fn allowed_sizes_must_end_at_the_max() {
        let c = parse(&["--enable_batching", "--allowed-batch-sizes=2,4,8"]).unwrap();
        assert_eq!(
            (c.max_batch_size, c.allowed_batch_sizes.clone()),
            (8, vec![2, 4, 8])
        );
        assert_eq!(warmup_batch_sizes(&c), vec![2, 4, 8]);
        let err = parse(&[
            "--enable_batching",
            "--allowed-batch-sizes=2,4",
            "--max-batch-size=8",
        ])
        .unwrap_err();
        assert!(err.contains("must equal"), "{err}");
        assert!(parse(&["--enable_batching", "--allowed-batch-sizes=4,2"]).is_err());
    }

    #[test]
    fn bad_file_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b.txt");
        std::fs::write(&file, "max_batch_sise { value: 3 }").unwrap();
        let err = parse(&["--batching_parameters_file", file.to_str().unwrap()]).unwrap_err();
        assert!(
            err.contains("max_batch_sise") && err.contains("b.txt"),
            "{err}"
        );
    }

    #[test]
    fn warmup_spread() {
        let c = parse(&["--enable_batching", "--max-batch-size=24"]).unwrap();
        assert_eq!(warmup_batch_sizes(&c), vec![1, 2, 4, 8, 16, 24]);
    }
}
