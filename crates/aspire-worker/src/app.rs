//! A whole worker: the version manager following a registry, and the gRPC API on a
//! listener, with a drain on shutdown. `aspire-worker` runs it over etcd, `aspire-server`
//! over an in-memory registry beside discovery.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aspire_registry::Registry;
use aspire_telemetry::metrics::{MetricsPort, MetricsServer, WorkerMetrics};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::batcher::BatchPool;
use crate::config::{BatchingArgs, RuntimeArgs, ServingArgs, StorageArgs, warmup_batch_sizes};
use crate::model;
use crate::server::{ServerLimits, serve};
use crate::service::{RequestLimits, ServingApi};
use crate::storage_roots::StorageRoots;
use crate::version_manager::{ManagerConfig, VersionManager};

/// How long an unloading version still answers requests that name it: routers see the
/// worker's new record within milliseconds, so this is ample, and it delays freeing the
/// old version's memory only by as much.
pub const UNLOAD_GRACE: Duration = Duration::from_secs(2);

/// How long a draining worker keeps taking requests after it deregistered.
pub const DEREGISTER_GRACE: Duration = Duration::from_millis(500);

/// `aspire-worker`'s `--metrics-port` when not given: its gRPC port's default (8501)
/// plus 1000, as the router's is (9500 for 8500).
pub const DEFAULT_METRICS_PORT: u16 = 9501;

/// What a worker needs besides its registry and listener.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Its id in the registry.
    pub worker_id: String,
    /// The gRPC address others reach it at.
    pub advertise_address: String,
    /// Batching flags.
    pub batching: BatchingArgs,
    /// Device and LibTorch threads.
    pub runtime: RuntimeArgs,
    /// gRPC serving flags.
    pub serving: ServingArgs,
    /// The only places model versions are loaded from (never from the registry).
    pub storage_roots: StorageRoots,
    /// Where Prometheus metrics are served, on the gRPC listener's address.
    pub metrics: MetricsPort,
}

/// Why a worker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerStartError {
    /// A flag's value cannot be used; the sentence names it.
    #[error("{0}")]
    Config(String),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Runs a worker on `listener` until `shutdown` resolves, then drains: deregisters (so
/// routers stop sending at once), stops taking requests and finishes those in flight,
/// then unloads every version. Prometheus metrics are served as `settings.metrics`
/// says, on the listener's address.
pub async fn run_worker(
    settings: WorkerSettings,
    registry: Arc<dyn Registry>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerStartError> {
    let ip = listener
        .local_addr()
        .map_err(|e| WorkerStartError::Config(format!("listener has no address: {e}")))?
        .ip();
    let metrics = settings
        .metrics
        .bind(ip)
        .await
        .map_err(WorkerStartError::Config)?;
    run_worker_with_metrics(settings, registry, listener, metrics, shutdown).await
}

/// [`run_worker`], serving `/metrics` on `metrics_listener` when there is one, whatever
/// `settings.metrics` says (tests hand it a listener on port 0).
pub async fn run_worker_with_metrics(
    settings: WorkerSettings,
    registry: Arc<dyn Registry>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerStartError> {
    // Checked before anything starts: a bad certificate must stop the worker at once.
    let tls = settings
        .serving
        .ssl_config_file
        .as_deref()
        .map(aspire_tls::ServerTls::load)
        .transpose()
        .map_err(|e| WorkerStartError::Config(e.to_string()))?;
    let metrics = WorkerMetrics::new();
    // Serves until this function returns.
    let _endpoint = metrics_listener
        .map(|l| MetricsServer::start(l, metrics.registry().clone()))
        .transpose()
        .map_err(|e| WorkerStartError::Config(format!("metrics listener: {e}")))?;
    settings
        .serving
        .validate()
        .map_err(WorkerStartError::Config)?;
    let batching = settings
        .batching
        .resolve()
        .map_err(WorkerStartError::Config)?;
    let intra = settings
        .runtime
        .intra_op_threads_for(batching.num_batch_threads);
    let inter =
        (settings.runtime.inter_op_threads > 0).then_some(settings.runtime.inter_op_threads);
    model::configure_threads(Some(intra), inter);
    let batch_pool = Arc::new(BatchPool::new(batching.num_batch_threads));
    let device_name =
        model::resolve_device(settings.runtime.device).map_err(WorkerStartError::Config)?;
    let local = listener
        .local_addr()
        .map_err(|e| WorkerStartError::Config(format!("listener has no address: {e}")))?;
    let cache_dir = settings.serving.cache_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "aspire-worker-{}-{}",
            std::process::id(),
            local.port()
        ))
    });
    tracing::info!(
        address = %local, advertise = %settings.advertise_address, worker_id = %settings.worker_id,
        device = %device_name, batching = ?batching, batch_threads = batching.num_batch_threads,
        intra_op_threads = intra, storage_roots = %settings.storage_roots.describe(),
        "worker starting"
    );
    let config = ManagerConfig {
        worker_id: settings.worker_id.clone(),
        advertise_address: settings.advertise_address.clone(),
        device: settings.runtime.device,
        warmup_batch_sizes: warmup_batch_sizes(&batching),
        batching,
        cache_dir: cache_dir.clone(),
        storage_roots: settings.storage_roots.clone(),
        load_retry_initial: Duration::from_secs(1),
        load_retry_max: Duration::from_secs(60),
        unload_grace: UNLOAD_GRACE,
        unload_drain: settings.serving.unload_drain(),
        slow_pass: settings.serving.slow_pass(),
        metrics: metrics.clone(),
        batch_pool: Some(batch_pool),
    };
    let (manager, manager_task) = VersionManager::start(config, device_name, registry);
    let api = ServingApi::new(
        manager.clone(),
        settings.serving.output_encoding.into(),
        RequestLimits {
            max_request_bytes: settings.serving.max_request_bytes,
        },
    );
    let draining = manager.clone();
    let (drain_started, drain_rx) = watch::channel(false);
    let serving = serving_until_drain(manager.ready(), drain_rx);
    let drain = async move {
        shutdown.await;
        tracing::info!(
            "draining: reporting NOT_SERVING, deregistering, then finishing requests in flight"
        );
        // First: a router that notices the record gone probes health and drops this
        // worker on NOT_SERVING, instead of keeping it as a worker whose record
        // vanished while it still answers (a lease lost to an etcd stall).
        drain_started.send_replace(true);
        draining.deregister().await;
        // Routers learn of the deregistration through their etcd watch within
        // milliseconds; until then they may still send. Keep serving a moment so those
        // requests are answered rather than refused (they would be retried elsewhere).
        tokio::time::sleep(DEREGISTER_GRACE).await;
    };
    let served = serve(
        api,
        serving,
        listener,
        ServerLimits {
            max_message_bytes: settings.serving.max_message_size_bytes,
            max_inflight_bytes: settings.serving.max_inflight_bytes,
            max_concurrent_streams: settings.serving.max_concurrent_streams,
        },
        tls,
        drain,
    )
    .await;
    manager.shutdown();
    let _ = manager_task.await;
    let _ = std::fs::remove_dir_all(&cache_dir);
    served?;
    tracing::info!("worker stopped");
    Ok(())
}

/// What the health service reports: `ready`, until the drain starts; NOT_SERVING from
/// then on, whatever `ready` does.
fn serving_until_drain(
    mut ready: watch::Receiver<bool>,
    mut draining: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*ready.borrow_and_update() && !*draining.borrow_and_update());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = ready.changed() => if changed.is_err() { break },
                changed = draining.changed() => if changed.is_err() { break },
                () = tx.closed() => break,
            }
            let serving = *ready.borrow_and_update() && !*draining.borrow_and_update();
            tx.send_if_modified(|s| std::mem::replace(s, serving) != serving);
            if *draining.borrow() {
                break;
            }
        }
    });
    rx
}

/// `aspire-worker`'s flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "aspire-worker",
    version,
    about = "Load the model versions etcd asks for and serve them over TensorFlow Serving's gRPC API"
)]
pub struct WorkerCli {
    /// Logging.
    #[command(flatten)]
    pub log: aspire_telemetry::LogArgs,
    /// Address to listen on.
    #[arg(long, env = "ASPIRE_WORKER_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// gRPC port.
    #[arg(long, env = "ASPIRE_WORKER_PORT", default_value_t = 8501)]
    pub port: u16,
    /// `host:port` routers reach this worker at (in Kubernetes: the pod IP, from the
    /// Downward API) [default: the listen address, or 127.0.0.1:PORT when listening on
    /// every interface].
    #[arg(
        long = "advertise-address",
        visible_alias = "advertise_address",
        env = "ASPIRE_WORKER_ADVERTISE_ADDRESS"
    )]
    pub advertise_address: Option<String>,
    /// This worker's id in etcd [default: HOSTNAME-PORT].
    #[arg(
        long = "worker-id",
        visible_alias = "worker_id",
        env = "ASPIRE_WORKER_ID"
    )]
    pub worker_id: Option<String>,
    /// etcd.
    #[command(flatten)]
    pub etcd: aspire_registry::cli::EtcdArgs,
    /// Batching.
    #[command(flatten)]
    pub batching: BatchingArgs,
    /// Device and LibTorch threads.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// gRPC serving.
    #[command(flatten)]
    pub serving: ServingArgs,
    /// Where model versions may be loaded from.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Port for Prometheus metrics on /metrics, on the --host address; 0 turns them off
    /// [default: 9501, best effort: if it is taken, the worker logs an error and runs
    /// without; a port given here must be free].
    #[arg(
        long = "metrics-port",
        visible_alias = "metrics_port",
        env = "ASPIRE_METRICS_PORT"
    )]
    pub metrics_port: Option<u16>,
}

impl WorkerCli {
    /// The worker settings these flags describe; `local` is the bound listen address.
    pub fn settings(
        &self,
        local: std::net::SocketAddr,
    ) -> Result<WorkerSettings, WorkerStartError> {
        let advertise_address = match &self.advertise_address {
            Some(a) => a.clone(),
            None if local.ip().is_unspecified() => format!("127.0.0.1:{}", local.port()),
            None => local.to_string(),
        };
        let worker_id = match &self.worker_id {
            Some(id) => id.clone(),
            None => format!("{}-{}", hostname(), local.port()),
        };
        if !aspire_core::keys::valid_worker_id(&worker_id) {
            return Err(WorkerStartError::Config(format!(
                "--worker-id {worker_id:?} is not usable as a key segment: use printable ASCII without '/'"
            )));
        }
        let storage_roots = self.storage.resolve().map_err(WorkerStartError::Config)?;
        if storage_roots.is_empty() {
            return Err(WorkerStartError::Config(NO_STORAGE_ROOT.to_string()));
        }
        Ok(WorkerSettings {
            worker_id,
            advertise_address,
            batching: self.batching.clone(),
            runtime: self.runtime.clone(),
            serving: self.serving.clone(),
            storage_roots,
            metrics: MetricsPort::from_flag(self.metrics_port, DEFAULT_METRICS_PORT),
        })
    }
}

/// Why a worker without a storage root does not start: it would have to load whatever
/// location the registry names, and whoever can write etcd would choose the code it runs.
pub const NO_STORAGE_ROOT: &str = "no --storage-root given: aspire-worker loads model versions only from the directories or bucket URLs named by --storage-root (repeatable, or comma-separated in ASPIRE_STORAGE_ROOTS), e.g. --storage-root=/models or --storage-root=s3://bucket/models; the registry cannot widen them";

/// This machine's host name (in Kubernetes: the pod name).
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn health_follows_readiness_until_the_drain_then_stays_not_serving() {
        let (ready, ready_rx) = watch::channel(false);
        let (drain, drain_rx) = watch::channel(false);
        let mut serving = serving_until_drain(ready_rx, drain_rx);
        assert!(!*serving.borrow_and_update());
        ready.send_replace(true);
        serving.changed().await.unwrap();
        assert!(*serving.borrow_and_update());
        drain.send_replace(true);
        serving.changed().await.unwrap();
        assert!(!*serving.borrow_and_update());
        // Readiness coming and going during the drain changes nothing.
        ready.send_replace(false);
        ready.send_replace(true);
        assert!(
            serving.changed().await.is_err(),
            "the sender ends with the drain"
        );
        assert!(!*serving.borrow());
    }
}
