//! The router: TensorFlow Serving's gRPC API in front of a cluster of workers. It watches
//! the registry (worker registrations and model keys) and forwards each Predict to a live
//! worker that has the right version AVAILABLE, as bytes, without decoding tensors.
//!
//! - [`config`]: the flags;
//! - [`error`]: the router's errors and their gRPC codes;
//! - [`wire`]: finding `model_spec` in a serialized `PredictRequest`;
//! - [`raw_codec`]: the gRPC codec that moves messages as bytes;
//! - `routing_table`: which versions and workers serve each model, rebuilt on every
//!   registry change;
//! - `workers`: channels, in-flight counts, marking workers down, keeping workers whose
//!   record vanished while they answer, power of two choices;
//! - `forward`: the Predict path (deadline, `--request-timeout-ms`, retry, re-picks
//!   when a worker is unloading the version it was sent);
//! - `prediction_service`: the raw Predict path and the typed methods under one service;
//! - `model_info`: GetModelMetadata and GetModelStatus from the registry.
//!
//! [`run`] is the whole router; `main` only parses flags, connects to etcd and calls it.

pub mod config;
pub mod error;
mod forward;
mod model_info;
mod prediction_service;
pub mod raw_codec;
mod routing_table;
pub mod wire;
mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use aspire_ingress::{InflightBudget, IngressLayer, PREDICT_PATH};
use aspire_proto::serving::model_service_server::ModelServiceServer;
use aspire_registry::Registry;
use aspire_telemetry::metrics::{MetricsServer, RouterMetrics};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use config::RouterConfig;
pub use error::RouterError;

use crate::forward::Router;
use crate::model_info::RouterApi;
use crate::prediction_service::PredictionRouter;
use crate::routing_table::RoutingTable;

/// The health service names the router reports: the whole server and the API.
const HEALTH_SERVICES: [&str; 2] = ["", "tensorflow.serving.PredictionService"];

/// Binds the configured address.
pub async fn bind(config: &RouterConfig) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = format!("{}:{}", config.host, config.port)
        .parse()
        .with_context(|| format!("--host {} --port {}", config.host, config.port))?;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Runs the router on `listener`, routing by what `registry` says, until `shutdown`
/// resolves; then it stops accepting and finishes the requests in flight. Health reports
/// SERVING once the first routing table is built. Prometheus metrics are served as
/// `--metrics-port` says, on the listener's address.
pub async fn run(
    config: RouterConfig,
    registry: Arc<dyn Registry>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let ip = listener.local_addr()?.ip();
    let metrics = config
        .metrics()
        .bind(ip)
        .await
        .map_err(anyhow::Error::msg)?;
    run_with_metrics(config, registry, listener, metrics, shutdown).await
}

/// [`run`], serving `/metrics` on `metrics_listener` when there is one, whatever
/// `--metrics-port` says (tests hand it a listener on port 0).
pub async fn run_with_metrics(
    config: RouterConfig,
    registry: Arc<dyn Registry>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    // Checked before anything starts: a bad certificate must stop the router at once.
    let tls = config
        .ssl_config_file
        .as_deref()
        .map(aspire_tls::ServerTls::load)
        .transpose()?;
    let worker_tls = config.worker_tls.client_config()?;
    if worker_tls.is_some() {
        tracing::info!("TLS to workers on: worker channels verify each worker's certificate");
    }
    let local = listener.local_addr()?;
    let table = Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
    let metrics = RouterMetrics::new({
        let table = Arc::clone(&table);
        move || table.load().workers.iter().filter(|w| w.is_live()).count()
    });
    // Serves until this function returns.
    let _endpoint = metrics_listener
        .map(|l| MetricsServer::start(l, metrics.registry().clone()))
        .transpose()
        .context("metrics listener")?;
    let (ready_tx, ready) = watch::channel(false);
    let follower = tokio::spawn(routing_table::follow_registry(
        registry.subscribe(),
        Arc::clone(&table),
        ready_tx,
        worker_tls,
        workers::VANISHED_PROBE_INTERVAL,
    ));
    let router = Arc::new(Router {
        table,
        max_message_bytes: config.max_message_size_bytes,
        probe_after: config.worker_probe_interval(),
        metrics,
        request_timeout: config.request_timeout(),
        retry_budget: forward::retry_budget(),
    });

    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;
    let health_task = tokio::spawn(report_ready(reporter.clone(), ready));
    let max = config.max_message_size_bytes;
    let models = ModelServiceServer::new(RouterApi::new(Arc::clone(&router)))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let ingress = IngressLayer::new(
        max,
        "--max-message-size-bytes",
        InflightBudget::new(
            config.max_inflight_bytes,
            "the router's in-flight request budget",
            "--max-inflight-bytes",
        ),
        &[PREDICT_PATH],
    );
    tracing::info!(address = %local, prefix = %registry.schema().prefix(), "aspire-router listening");

    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(config.max_concurrent_streams)
        .layer(ingress)
        .add_service(health)
        .add_service(PredictionRouter::new(router))
        .add_service(models);
    let stop = async {
        shutdown.await;
        health_task.abort();
        set_health(&reporter, ServingStatus::NotServing).await;
        tracing::info!("aspire-router stops accepting; finishing requests in flight");
    };
    let result = match tls {
        Some(tls) => {
            server
                .serve_with_incoming_shutdown(aspire_tls::tls_incoming(listener, tls), stop)
                .await
        }
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            server.serve_with_incoming_shutdown(incoming, stop).await
        }
    };
    follower.abort();
    // Held to here: dropping a registry may stop its watch (etcd's background tasks).
    drop(registry);
    result.context("the gRPC server failed")
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for service in HEALTH_SERVICES {
        reporter.set_service_status(service, status).await;
    }
}

async fn report_ready(reporter: HealthReporter, mut ready: watch::Receiver<bool>) {
    if ready.wait_for(|r| *r).await.is_ok() {
        set_health(&reporter, ServingStatus::Serving).await;
    }
}
