//! Discovery as a service: the model flags `tensorflow_model_server` users know
//! (`--model_name`, `--model_base_path`, `--model_config_file`, the two poll intervals),
//! and [`run`], which polls storage and re-reads the config file until shutdown. Both
//! `aspire-server` and `aspire-discovery` use it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aspire_registry::Registry;
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::model_config::{ModelConfig, parse_model_config_file};
use crate::storage_poller::{ModelsHandle, StoragePoller};

/// `aspire-discovery`'s flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "aspire-discovery",
    version,
    about = "Publish the model versions found in storage to etcd"
)]
pub struct DiscoveryCli {
    /// Models and storage polling.
    #[command(flatten)]
    pub models: ModelArgs,
    /// etcd.
    #[command(flatten)]
    pub etcd: aspire_registry::cli::EtcdArgs,
    /// Logging.
    #[command(flatten)]
    pub log: aspire_telemetry::LogArgs,
}

/// Which models to serve and how often to look at them.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
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
    /// Poll storage for new versions every N seconds (0: load what storage holds at
    /// startup, polling each second only until those versions settle, then stop).
    #[arg(
        long = "file_system_poll_wait_seconds",
        visible_alias = "file-system-poll-wait-seconds",
        env = "ASPIRE_FILE_SYSTEM_POLL_WAIT_SECONDS",
        default_value_t = 1
    )]
    pub file_system_poll_wait_seconds: u64,
}

impl ModelArgs {
    /// The models to serve, from the flags or the config file; the error names the flag.
    pub fn models(&self) -> Result<Vec<ModelConfig>, String> {
        if let Some(path) = &self.model_config_file {
            return read_model_config_file(path);
        }
        let Some(base) = &self.model_base_path else {
            return Err("give --model_base_path (with --model_name) or --model_config_file".into());
        };
        ModelConfig::single(&self.model_name, base).map(|m| vec![m])
    }
}

fn read_model_config_file(path: &Path) -> Result<Vec<ModelConfig>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--model_config_file {}: {e}", path.display()))?;
    parse_model_config_file(&text)
        .map_err(|e| format!("--model_config_file {}: {e}", path.display()))
}

/// Polls storage and publishes to `registry` until `stop` is cancelled; re-reads the model
/// config file when asked to. `models` is what [`ModelArgs::models`] returned at startup.
pub async fn run(
    args: ModelArgs,
    models: Vec<ModelConfig>,
    registry: Arc<dyn Registry>,
    stop: CancellationToken,
) {
    let poller = StoragePoller::new(models.clone());
    let reload = args
        .model_config_file
        .clone()
        .filter(|_| args.model_config_file_poll_wait_seconds > 0)
        .map(|path| {
            let every = Duration::from_secs(args.model_config_file_poll_wait_seconds);
            tokio::spawn(reload_model_config(
                path,
                every,
                models,
                poller.handle(),
                stop.clone(),
            ))
        });
    let interval = Duration::from_secs(args.file_system_poll_wait_seconds);
    poller
        .run(registry, interval, stop.clone().cancelled_owned())
        .await;
    if let Some(task) = reload {
        let _ = task.await;
    }
}

/// Re-reads the model config file every `every`; a file that fails to parse keeps the
/// models as they are (and says why).
async fn reload_model_config(
    path: PathBuf,
    every: Duration,
    mut current: Vec<ModelConfig>,
    handle: ModelsHandle,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match read_model_config_file(&path) {
            Ok(models) if models != current => {
                tracing::info!(models = ?models.iter().map(|m| m.name.to_string()).collect::<Vec<_>>(), "model config changed");
                handle.set_models(models.clone());
                current = models;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("keeping the current models: {e}"),
        }
    }
}
