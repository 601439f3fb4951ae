//! `aspire-server`: discovery, an in-memory registry and a worker in one process, a
//! drop-in for `tensorflow_model_server` on one machine. A TensorFlow Serving command line
//! starts it unchanged (flags in TF Serving's snake_case, or kebab-case, or from
//! `ASPIRE_*` environment variables).
//!
//! [`run`] is the whole server; `main` only parses flags, starts logging and calls it.

pub mod tf_flags;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use aspire_discovery::model_config::{ModelConfig, parse_model_config_file};
use aspire_discovery::storage_poller::{ModelsHandle, StoragePoller};
use aspire_registry::{MemoryRegistry, Registry};
use aspire_worker::codec::OutputEncoding;
use aspire_worker::config::{BatchingArgs, RuntimeArgs, available_cpus, warmup_batch_sizes};
use aspire_worker::model;
use aspire_worker::server::{DEFAULT_MAX_MESSAGE_BYTES, serve};
use aspire_worker::service::ServingApi;
use aspire_worker::version_manager::{ManagerConfig, VersionManager};
use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How outputs are encoded in Predict responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EncodingArg {
    /// Typed repeated fields (`float_val`, ...), as TensorFlow Serving answers.
    Typed,
    /// Little-endian bytes in `tensor_content`: cheaper for large outputs.
    TensorContent,
}

/// `aspire-server`'s flags.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "aspire-server",
    version,
    about = "Serve TorchScript models with TensorFlow Serving's gRPC API, in one process"
)]
pub struct Config {
    /// gRPC port.
    #[arg(long, env = "ASPIRE_PORT", default_value_t = 8500)]
    pub port: u16,
    /// Address to listen on (TensorFlow Serving listens on every interface).
    #[arg(long, env = "ASPIRE_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Name of the one model to serve (with --model_base_path).
    #[arg(
        long = "model_name",
        visible_alias = "model-name",
        env = "ASPIRE_MODEL_NAME",
        default_value = "default"
    )]
    pub model_name: String,
    /// Where its numbered versions are: a directory, file://, s3://, gs:// or az:// URL.
    #[arg(
        long = "model_base_path",
        visible_alias = "model-base-path",
        env = "ASPIRE_MODEL_BASE_PATH"
    )]
    pub model_base_path: Option<String>,
    /// TensorFlow Serving's text-format ModelServerConfig, for several models.
    #[arg(
        long = "model_config_file",
        visible_alias = "model-config-file",
        env = "ASPIRE_MODEL_CONFIG_FILE",
        conflicts_with = "model_base_path"
    )]
    pub model_config_file: Option<PathBuf>,
    /// Re-read --model_config_file every N seconds (0: read once).
    #[arg(
        long = "model_config_file_poll_wait_seconds",
        visible_alias = "model-config-file-poll-wait-seconds",
        env = "ASPIRE_MODEL_CONFIG_FILE_POLL_WAIT_SECONDS",
        default_value_t = 0
    )]
    pub model_config_file_poll_wait_seconds: u64,
    /// Poll storage for new versions every N seconds (0: once at startup).
    #[arg(
        long = "file_system_poll_wait_seconds",
        visible_alias = "file-system-poll-wait-seconds",
        env = "ASPIRE_FILE_SYSTEM_POLL_WAIT_SECONDS",
        default_value_t = 1
    )]
    pub file_system_poll_wait_seconds: u64,
    /// Batching.
    #[command(flatten)]
    pub batching: BatchingArgs,
    /// Device and LibTorch threads.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Worker threads of the async runtime that serves gRPC [default: the CPUs this
    /// process may use].
    #[arg(
        long = "runtime-worker-threads",
        visible_alias = "runtime_worker_threads",
        env = "ASPIRE_RUNTIME_WORKER_THREADS"
    )]
    pub runtime_worker_threads: Option<usize>,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long = "max-message-size-bytes", visible_alias = "max_message_size_bytes", env = "ASPIRE_MAX_MESSAGE_SIZE_BYTES",
          default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_size_bytes: usize,
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
}

impl Config {
    /// Threads for the async runtime.
    pub fn runtime_threads(&self) -> usize {
        self.runtime_worker_threads
            .unwrap_or_else(available_cpus)
            .max(1)
    }

    /// The models to serve, from the flags or the config file.
    pub fn models(&self) -> anyhow::Result<Vec<ModelConfig>> {
        if let Some(path) = &self.model_config_file {
            return read_model_config_file(path);
        }
        let Some(base) = &self.model_base_path else {
            bail!("give --model_base_path (with --model_name) or --model_config_file");
        };
        ModelConfig::single(&self.model_name, base)
            .map(|m| vec![m])
            .map_err(|e| anyhow::anyhow!("--model_name/--model_base_path: {e}"))
    }
}

fn read_model_config_file(path: &std::path::Path) -> anyhow::Result<Vec<ModelConfig>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--model_config_file {}", path.display()))?;
    parse_model_config_file(&text)
        .map_err(|e| anyhow::anyhow!("--model_config_file {}: {e}", path.display()))
}

/// Binds the configured address.
pub async fn bind(config: &Config) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = format!("{}:{}", config.host, config.port)
        .parse()
        .with_context(|| format!("--host {} --port {}", config.host, config.port))?;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Runs the server on `listener` until `shutdown` resolves, then drains: stops taking
/// requests, finishes those in flight, unloads the models.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let models = config.models()?;
    let batching = config.batching.resolve().map_err(anyhow::Error::msg)?;
    let intra = (config.runtime.intra_op_threads > 0).then_some(config.runtime.intra_op_threads);
    let inter = (config.runtime.inter_op_threads > 0).then_some(config.runtime.inter_op_threads);
    model::configure_threads(intra, inter);
    let device_name = model::resolve_device(config.runtime.device).map_err(anyhow::Error::msg)?;
    let local = listener.local_addr()?;
    let cache_dir = match &config.cache_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!(
            "aspire-server-{}-{}",
            std::process::id(),
            local.port()
        )),
    };
    tracing::info!(
        address = %local, device = %device_name, batching = ?batching,
        models = ?models.iter().map(|m| m.name.to_string()).collect::<Vec<_>>(),
        "aspire-server starting"
    );

    let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::default());
    let manager_config = ManagerConfig {
        worker_id: "aspire-server".to_string(),
        advertise_address: local.to_string(),
        device: config.runtime.device,
        warmup_batch_sizes: warmup_batch_sizes(&batching),
        batching,
        cache_dir: cache_dir.clone(),
        load_retry_initial: Duration::from_secs(1),
        load_retry_max: Duration::from_secs(60),
    };
    let (manager, manager_task) =
        VersionManager::start(manager_config, device_name, registry.clone());

    let stop = CancellationToken::new();
    let poller = StoragePoller::new(models);
    let poll_interval = Duration::from_secs(config.file_system_poll_wait_seconds);
    let reload = config
        .model_config_file
        .clone()
        .filter(|_| config.model_config_file_poll_wait_seconds > 0)
        .map(|path| {
            reload_model_config(
                path,
                Duration::from_secs(config.model_config_file_poll_wait_seconds),
                poller.handle(),
                stop.clone(),
            )
        });
    let poller_task = tokio::spawn(poller.run(
        registry.clone(),
        poll_interval,
        stop.clone().cancelled_owned(),
    ));
    let reload_task = reload.map(tokio::spawn);

    let encoding = match config.output_encoding {
        EncodingArg::Typed => OutputEncoding::Typed,
        EncodingArg::TensorContent => OutputEncoding::TensorContent,
    };
    let api = ServingApi::new(manager.clone(), encoding);
    let served = serve(
        api,
        manager.ready(),
        listener,
        config.max_message_size_bytes,
        shutdown,
    )
    .await;
    tracing::info!("stopped taking requests; unloading models");
    stop.cancel();
    manager.shutdown();
    let _ = manager_task.await;
    let _ = poller_task.await;
    if let Some(t) = reload_task {
        let _ = t.await;
    }
    let _ = std::fs::remove_dir_all(&cache_dir);
    served.context("gRPC server failed")?;
    tracing::info!("aspire-server stopped");
    Ok(())
}

/// Re-reads the model config file every `every`; a file that fails to parse keeps the
/// models as they are (and says why).
async fn reload_model_config(
    path: PathBuf,
    every: Duration,
    handle: ModelsHandle,
    stop: CancellationToken,
) {
    let mut last: Option<Vec<ModelConfig>> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match read_model_config_file(&path) {
            Ok(models) if last.as_ref() != Some(&models) => {
                tracing::info!(models = ?models.iter().map(|m| m.name.to_string()).collect::<Vec<_>>(), "model config changed");
                handle.set_models(models.clone());
                last = Some(models);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("keeping the current models: {e:#}"),
        }
    }
}
