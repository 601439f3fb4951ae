//! `aspire-server`: discovery, an in-memory registry and a worker in one process, a
//! drop-in for `tensorflow_model_server` on one machine. A TensorFlow Serving command line
//! starts it unchanged (flags in TF Serving's snake_case, or kebab-case, or from
//! `ASPIRE_*` environment variables).
//!
//! [`run`] is the whole server; `main` only parses flags, starts logging and calls it.

pub mod tf_flags;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use aspire_discovery::service::{self as discovery, ModelArgs};
use aspire_registry::{MemoryRegistry, Registry};
use aspire_telemetry::metrics::MetricsPort;
use aspire_worker::app::{WorkerSettings, run_worker};
use aspire_worker::config::{BatchingArgs, RuntimeArgs, ServingArgs, StorageArgs};
use aspire_worker::storage_roots::StorageRoots;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `aspire-server`'s flags.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "aspire-server",
    version,
    about = "Serve TorchScript models with TensorFlow Serving's gRPC API, in one process"
)]
pub struct Config {
    /// Logging.
    #[command(flatten)]
    pub log: aspire_telemetry::LogArgs,
    /// gRPC port.
    #[arg(long, env = "ASPIRE_PORT", default_value_t = 8500)]
    pub port: u16,
    /// Address to listen on (TensorFlow Serving listens on every interface).
    #[arg(long, env = "ASPIRE_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Models and storage polling.
    #[command(flatten)]
    pub models: ModelArgs,
    /// Batching.
    #[command(flatten)]
    pub batching: BatchingArgs,
    /// Device and LibTorch threads.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// gRPC serving.
    #[command(flatten)]
    pub serving: ServingArgs,
    /// More places model versions may be loaded from, besides the model base paths (a
    /// directory that version symlinks point into, or that holds the base paths of models
    /// a re-read --model_config_file adds).
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Port for Prometheus metrics (`aspire_worker_*`) on /metrics, on the --host
    /// address; it must be free [default: off, as TensorFlow Serving's monitoring is
    /// until configured].
    #[arg(
        long = "metrics-port",
        visible_alias = "metrics_port",
        env = "ASPIRE_METRICS_PORT"
    )]
    pub metrics_port: Option<u16>,
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

/// The roots versions are loaded from: the models' base paths (as discovery reads them at
/// startup) and any `--storage-root`.
pub fn storage_roots(
    args: &StorageArgs,
    models: &[aspire_discovery::ModelConfig],
) -> Result<StorageRoots, String> {
    let base_paths: Vec<&str> = models.iter().map(|m| m.base_path.as_str()).collect();
    let from_models = StorageRoots::parse(&base_paths, "model base path")?;
    Ok(args.resolve()?.union(from_models))
}

/// Runs the server on `listener` until `shutdown` resolves, then drains: stops taking
/// requests, finishes those in flight, unloads the models.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let models = config.models.models().map_err(anyhow::Error::msg)?;
    let storage_roots = storage_roots(&config.storage, &models).map_err(anyhow::Error::msg)?;
    let local = listener.local_addr()?;
    tracing::info!(models = ?models.iter().map(|m| m.name.to_string()).collect::<Vec<_>>(), "aspire-server starting");
    let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::default());
    let stop = CancellationToken::new();
    let discovery = tokio::spawn(discovery::run(
        config.models.clone(),
        models,
        registry.clone(),
        stop.clone(),
    ));
    let settings = WorkerSettings {
        worker_id: "aspire-server".to_string(),
        advertise_address: local.to_string(),
        batching: config.batching,
        runtime: config.runtime,
        serving: config.serving,
        storage_roots,
        metrics: MetricsPort::from_flag(config.metrics_port, 0),
    };
    let result = run_worker(settings, registry, listener, shutdown).await;
    stop.cancel();
    let _ = discovery.await;
    result?;
    tracing::info!("aspire-server stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_base_paths_are_storage_roots_beside_the_flag() {
        let config = Config::try_parse_from([
            "aspire-server",
            "--model_name=mnist",
            "--model_base_path=/srv/models/mnist/",
            "--storage-root=/data/exports",
        ])
        .unwrap();
        let models = config.models.models().unwrap();
        let roots = storage_roots(&config.storage, &models).unwrap();
        assert_eq!(
            roots.describe(),
            "file:///data/exports, file:///srv/models/mnist"
        );
        let as_is = |p: &std::path::Path| Ok(p.to_path_buf());
        assert!(
            roots
                .check_with("file:///srv/models/mnist/3", as_is)
                .is_ok()
        );
        assert!(
            roots
                .check_with("file:///srv/models/other/3", as_is)
                .is_err()
        );

        let bad = Config::try_parse_from([
            "aspire-server",
            "--model_name=mnist",
            "--model_base_path=ftp://host/mnist",
        ])
        .unwrap();
        let err = storage_roots(&bad.storage, &bad.models.models().unwrap()).unwrap_err();
        assert!(
            err.starts_with("model base path \"ftp://host/mnist\""),
            "{err}"
        );
    }
}
