//! A fake worker: a real gRPC server on loopback that answers Predict with which worker
//! it is and which `model_spec.version` it received, and records every request's raw
//! bytes and `grpc-timeout` header. Its behaviour can be switched while it runs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use aspire_proto::TensorProto;
use aspire_proto::serving::{PredictRequest, PredictResponse, model_spec::VersionChoice};
use aspire_router::raw_codec::RawCodec;
use bytes::Bytes;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

const PREDICTION_SERVICE: &str = "tensorflow.serving.PredictionService";

/// How the fake answers Predict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// At once.
    Normal,
    /// After this long.
    Delay(Duration),
    /// Never (counts a cancellation when the call is dropped).
    Hang,
    /// With this status code, as a worker would for a bad request or while draining.
    Fail(Code),
    /// A request for `version` gets a worker's "version unloading" answer (UNAVAILABLE
    /// with `x-aspire-unloading`, and `x-aspire-default-version` when `default` is
    /// given); others are answered at once.
    Unloading { version: i64, default: Option<i64> },
}

/// One Predict the fake received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The request as it came over the wire.
    pub body: Bytes,
    /// Its `grpc-timeout` header.
    pub timeout: Option<String>,
    /// Every header it came with.
    pub metadata: tonic::metadata::MetadataMap,
}

/// What tests look at and switch.
pub struct WorkerState {
    pub id: String,
    pub calls: AtomicUsize,
    pub cancelled: AtomicUsize,
    pub mode: Mutex<Mode>,
    pub received: Mutex<Vec<Received>>,
}

impl WorkerState {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn last(&self) -> Received {
        self.received
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no request received")
    }
}

/// A running fake worker.
pub struct FakeWorker {
    pub state: Arc<WorkerState>,
    pub addr: SocketAddr,
    health: HealthReporter,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl FakeWorker {
    /// Starts on a free loopback port.
    pub async fn start(id: &str) -> Self {
        Self::start_on(id, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on `addr` (to come back where a stopped worker was).
    pub async fn start_on(id: &str, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(WorkerState {
            id: id.to_string(),
            calls: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            mode: Mutex::new(Mode::Normal),
            received: Mutex::new(Vec::new()),
        });
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(PREDICTION_SERVICE, ServingStatus::Serving)
            .await;
        let (stop, stopped) = oneshot::channel::<()>();
        let service = FakePrediction(Arc::clone(&state));
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(service)
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            state,
            addr,
            health: reporter,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Sets what its health service answers for the prediction service.
    pub async fn set_health(&self, status: ServingStatus) {
        self.health
            .set_service_status(PREDICTION_SERVICE, status)
            .await;
    }

    /// Shuts its server down gracefully and waits until the port is closed.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// Counts a hanging call that was dropped: the client's cancellation reached the worker.
struct CancelGuard(Arc<WorkerState>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.cancelled.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct FakePrediction(Arc<WorkerState>);

impl NamedService for FakePrediction {
    const NAME: &'static str = PREDICTION_SERVICE;
}

impl tower::Service<http::Request<Body>> for FakePrediction {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let state = Arc::clone(&self.0);
        Box::pin(async move {
            let max = Some(64 << 20);
            let mut grpc =
                Grpc::new(RawCodec::<Bytes>::new()).apply_max_message_size_config(max, max);
            Ok(grpc.unary(FakePredict(state), req).await)
        })
    }
}

struct FakePredict(Arc<WorkerState>);

impl UnaryService<Bytes> for FakePredict {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let state = Arc::clone(&self.0);
        Box::pin(async move {
            let timeout = req
                .metadata()
                .get("grpc-timeout")
                .map(|v| v.to_str().unwrap().to_string());
            let metadata = req.metadata().clone();
            let body = req.into_inner();
            state.received.lock().unwrap().push(Received {
                body: body.clone(),
                timeout,
                metadata,
            });
            state.calls.fetch_add(1, Ordering::SeqCst);
            let mode = *state.mode.lock().unwrap();
            match mode {
                Mode::Normal => {}
                Mode::Delay(d) => tokio::time::sleep(d).await,
                Mode::Hang => {
                    let _guard = CancelGuard(Arc::clone(&state));
                    std::future::pending::<()>().await;
                }
                Mode::Fail(code) => {
                    return Err(Status::new(
                        code,
                        format!("worker {} fails on purpose", state.id),
                    ));
                }
                Mode::Unloading { .. } => {}
            }
            let request = PredictRequest::decode(body)
                .map_err(|e| Status::invalid_argument(format!("fake worker: {e}")))?;
            let spec = request.model_spec.unwrap_or_default();
            let version = match spec.version_choice {
                Some(VersionChoice::Version(v)) => v,
                _ => 0,
            };
            if let Mode::Unloading {
                version: unloading,
                default,
            } = mode
                && version == unloading
            {
                let mut trailers = tonic::metadata::MetadataMap::new();
                trailers.insert("x-aspire-unloading", version.into());
                if let Some(d) = default {
                    trailers.insert("x-aspire-default-version", d.into());
                }
                return Err(Status::with_metadata(
                    Code::Unavailable,
                    format!("worker {} is unloading version {version}", state.id),
                    trailers,
                ));
            }
            let outputs = HashMap::from([
                (
                    "worker".to_string(),
                    TensorProto {
                        dtype: 7,
                        string_val: vec![state.id.as_bytes().to_vec()],
                        ..Default::default()
                    },
                ),
                (
                    "version".to_string(),
                    TensorProto {
                        dtype: 9,
                        int64_val: vec![version],
                        ..Default::default()
                    },
                ),
            ]);
            let response = PredictResponse {
                model_spec: Some(spec),
                outputs,
            };
            Ok(Response::new(Bytes::from(response.encode_to_vec())))
        })
    }
}
