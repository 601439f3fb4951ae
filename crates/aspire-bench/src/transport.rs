//! The transport ceiling: a bare `PredictionService` that decodes the same
//! `PredictRequest` the worker gets and answers a `PredictResponse` of the same size
//! without running anything, served the way the worker serves (tonic, `TCP_NODELAY`, the
//! same message limits). The load generator drives it like a worker, so the gap between
//! the two is what the model, the batcher and the worker's codec add.

use std::future::Future;

use aspire_proto::serving::prediction_service_server::{
    PredictionService, PredictionServiceServer,
};
use aspire_proto::serving::{
    ClassificationRequest, ClassificationResponse, GetModelMetadataRequest,
    GetModelMetadataResponse, MultiInferenceRequest, MultiInferenceResponse, PredictRequest,
    PredictResponse, RegressionRequest, RegressionResponse,
};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// The worker's default message limit (TensorFlow Serving's, 2 GiB − 1).
pub const MAX_MESSAGE_BYTES: usize = i32::MAX as usize;

/// Answers every Predict with the same response.
#[derive(Debug, Clone)]
pub struct BareService {
    response: PredictResponse,
}

impl BareService {
    /// A service that answers `response` to every Predict.
    pub fn new(response: PredictResponse) -> Self {
        Self { response }
    }
}

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!(
        "the transport-ceiling server answers Predict only, not {method}"
    ))
}

#[tonic::async_trait]
impl PredictionService for BareService {
    async fn classify(
        &self,
        _: Request<ClassificationRequest>,
    ) -> Result<Response<ClassificationResponse>, Status> {
        Err(unimplemented("Classify"))
    }

    async fn regress(
        &self,
        _: Request<RegressionRequest>,
    ) -> Result<Response<RegressionResponse>, Status> {
        Err(unimplemented("Regress"))
    }

    async fn predict(
        &self,
        request: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        // The request was decoded (as the worker's is); keep it alive until here so its
        // buffers are freed on this task, as the worker's are.
        drop(request);
        Ok(Response::new(self.response.clone()))
    }

    async fn multi_inference(
        &self,
        _: Request<MultiInferenceRequest>,
    ) -> Result<Response<MultiInferenceResponse>, Status> {
        Err(unimplemented("MultiInference"))
    }

    async fn get_model_metadata(
        &self,
        _: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        Err(unimplemented("GetModelMetadata"))
    }
}

/// Serves `service` on `listener` until `shutdown` resolves.
pub async fn serve(
    service: BareService,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let prediction = PredictionServiceServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(prediction)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::load::{LoadConfig, run_load};
    use crate::request::{OutputEncoding, RequestSpec, response_like};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_load_generator_drives_the_bare_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let response = response_like(
            "mnist",
            "predict_images",
            "scores",
            &[1, 10],
            OutputEncoding::Typed,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(BareService::new(response), listener, async {
            let _ = stopped.await;
        }));
        let config = LoadConfig {
            server: addr.to_string(),
            request: RequestSpec {
                model: "mnist".into(),
                signature: "predict_images".into(),
                version: None,
                input_name: "images".into(),
                shape: vec![1, 784],
            },
            concurrency: 20,
            tasks_per_connection: 16,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(400),
            timeout: Duration::from_secs(5),
            watch: vec![crate::load::Watched {
                name: "self".into(),
                pid: std::process::id(),
            }],
            worker_metrics_url: None,
            tags: BTreeMap::from([("path".to_string(), "transport".to_string())]),
        };
        let report = run_load(&config).await.unwrap();
        assert_eq!(report.connections, 2);
        assert!(report.requests > 50, "{report:?}");
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.outputs, vec![("scores".to_string(), 10)]);
        let l = &report.latency;
        assert!(l.min_us <= l.p50_us && l.p50_us <= l.p90_us && l.p90_us <= l.p99_us);
        assert!(l.p99_us <= l.max_us);
        assert!(
            (report.duration_s - 0.4).abs() < 0.1,
            "{}",
            report.duration_s
        );
        assert!(report.watched_cpu.contains_key("self"));
        assert_eq!(report.tags["path"], "transport");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_server_that_is_not_there_fails_before_the_run() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let config = LoadConfig {
            server: addr.to_string(),
            request: RequestSpec {
                model: "m".into(),
                signature: "s".into(),
                version: None,
                input_name: "x".into(),
                shape: vec![1, 4],
            },
            concurrency: 1,
            tasks_per_connection: 16,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
            watch: vec![],
            worker_metrics_url: None,
            tags: BTreeMap::new(),
        };
        let err = run_load(&config).await.unwrap_err();
        assert!(err.to_string().contains("cannot connect"), "{err}");
    }
}
