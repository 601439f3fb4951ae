//! Serving the gRPC API on an already-bound listener, with the gRPC health protocol,
//! in plaintext or over TLS (`--ssl_config_file`).

use std::future::Future;

use aspire_proto::serving::model_service_server::ModelServiceServer;
use aspire_proto::serving::prediction_service_server::PredictionServiceServer;
use aspire_tls::{ServerTls, tls_incoming};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::service::ServingApi;

/// TensorFlow Serving's limit on message size (2 GiB − 1), the default of
/// `--max-message-size-bytes`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = i32::MAX as usize;

/// Serves `api` on `listener` until `shutdown` resolves, then stops accepting and lets
/// requests in flight finish. The health service reports SERVING for the whole server
/// ("") and for `PredictionService` while `ready` is true. With `tls`, every connection
/// must complete a TLS handshake first (plaintext clients are refused).
pub async fn serve(
    api: ServingApi,
    mut ready: watch::Receiver<bool>,
    listener: TcpListener,
    max_message_bytes: usize,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
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
    let router = tonic::transport::Server::builder()
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
