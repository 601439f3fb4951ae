//! `tensorflow.serving.PredictionService` as the router serves it: Predict goes down the
//! raw-bytes path ([`crate::forward`]) so its tensors are never decoded; every other
//! method goes to the generated typed server ([`crate::model_info`]).
//!
//! One hand-written service in front of the generated one, rather than a second service
//! under the same name: tonic routes by service name, so both must be one service.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use aspire_proto::serving::prediction_service_server::{PredictionServiceServer, SERVICE_NAME};
use bytes::Bytes;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};
use tower::Service;

use crate::forward::{PREDICT_PATH, Router};
use crate::model_info::RouterApi;
use crate::raw_codec::RawCodec;

/// The router's `PredictionService`.
#[derive(Clone)]
pub(crate) struct PredictionRouter {
    router: Arc<Router>,
    typed: PredictionServiceServer<RouterApi>,
}

impl PredictionRouter {
    pub(crate) fn new(router: Arc<Router>) -> Self {
        let max = router.max_message_bytes;
        let typed = PredictionServiceServer::new(RouterApi::new(Arc::clone(&router)))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        Self { router, typed }
    }
}

impl NamedService for PredictionRouter {
    const NAME: &'static str = SERVICE_NAME;
}

impl Service<http::Request<Body>> for PredictionRouter {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != PREDICT_PATH {
            return self.typed.call(request);
        }
        let router = Arc::clone(&self.router);
        Box::pin(async move {
            let max = Some(router.max_message_bytes);
            let mut grpc =
                Grpc::new(RawCodec::<Bytes>::new()).apply_max_message_size_config(max, max);
            Ok(grpc.unary(PredictMethod(router), request).await)
        })
    }
}

/// Predict, with the request and response as bytes.
struct PredictMethod(Arc<Router>);

impl UnaryService<Bytes> for PredictMethod {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let router = Arc::clone(&self.0);
        Box::pin(async move { router.predict(request).await })
    }
}
