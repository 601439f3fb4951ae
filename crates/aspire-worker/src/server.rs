//! Serving the gRPC API on an already-bound listener, with the gRPC health protocol,
//! in plaintext or over TLS (`--ssl_config_file`).

use std::future::Future;

use aspire_ingress::{InflightBudget, IngressLayer, PREDICT_PATH};
use aspire_proto::serving::model_service_server::ModelServiceServer;
use aspire_proto::serving::prediction_service_server::PredictionServiceServer;
use aspire_tls::{ServerTls, tls_incoming};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::service::ServingApi;

/// What the server holds every connection and request to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest gRPC message taken or sent (`--max-message-size-bytes`).
    pub max_message_bytes: usize,
    /// Request bytes held at once before new Predicts are shed (`--max-inflight-bytes`).
    pub max_inflight_bytes: usize,
    /// Open requests per HTTP/2 connection (`--max-concurrent-streams`).
    pub max_concurrent_streams: u32,
}

/// Serves `api` on `listener` until `shutdown` resolves, then stops accepting and lets
/// requests in flight finish. Every request is held to `limits` as its bytes arrive
/// ([`aspire_ingress`]). The health service reports SERVING for the whole server
/// ("") and for `PredictionService` while `ready` is true. With `tls`, every connection
/// must complete a TLS handshake first (plaintext clients are refused).
pub async fn serve(
    api: ServingApi,
    mut ready: watch::Receiver<bool>,
    listener: TcpListener,
    limits: ServerLimits,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let max_message_bytes = limits.max_message_bytes;
    let (reporter, health) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(async move {
        loop {
            let status = if *ready.borrow_and_update() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status("tensorflow.serving.PredictionService", status)
                .await;
            if ready.changed().await.is_err() {
                break;
            }
        }
    });
    let prediction = PredictionServiceServer::new(api.clone())
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let models = ModelServiceServer::new(api)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let ingress = IngressLayer::new(
        max_message_bytes,
        "--max-message-size-bytes",
        InflightBudget::new(
            limits.max_inflight_bytes,
            "the worker's in-flight request budget",
            "--max-inflight-bytes",
        ),
        &[PREDICT_PATH],
    );
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .layer(ingress)
        .add_service(health)
        .add_service(prediction)
        .add_service(models);
    let result = match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls_incoming(listener, tls), shutdown)
                .await
        }
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    };
    health_task.abort();
    result
}
