//! The tower layer in front of every gRPC server of Aspire. It wraps each request's
//! body so that, as bytes arrive and before tonic buffers a message:
//!
//! - the 5-byte gRPC header of the first message is read, and a message declaring more
//!   than the size limit fails with INVALID_ARGUMENT naming the limit and its flag (tonic
//!   would answer OUT_OF_RANGE, which clients and routers read as something else);
//! - for budgeted methods (Predict), the declared message length is charged to the
//!   process's [`InflightBudget`] at once (tonic reserves that much as soon as it reads the
//!   header), and any later message's bytes as they come; a charge that does not fit
//!   fails with RESOURCE_EXHAUSTED naming the budget. The request's [`RequestBudget`] goes
//!   into its extensions, so the handler can charge its decoded tensors and hold the
//!   bytes until it answers.
//!
//! The errors surface through tonic's decoder, which keeps a `Status` that a body yields.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::budget::{InflightBudget, RequestBudget};

/// Length of a gRPC message header: a compression flag and a big-endian u32 length.
const HEADER_LEN: usize = 5;

/// What the layer enforces.
#[derive(Debug)]
struct Limits {
    max_message_bytes: usize,
    message_flag: &'static str,
    budget: Arc<InflightBudget>,
    /// gRPC paths whose requests are charged to the budget.
    budgeted: Vec<&'static str>,
}

/// Checks message sizes and charges the in-flight budget; see the module docs.
#[derive(Debug, Clone)]
pub struct IngressLayer(Arc<Limits>);

impl IngressLayer {
    /// Messages over `max_message_bytes` (set by `message_flag`) are refused; requests
    /// to the gRPC paths in `budgeted` (e.g. `/tensorflow.serving.PredictionService/Predict`)
    /// are charged to `budget`.
    pub fn new(
        max_message_bytes: usize,
        message_flag: &'static str,
        budget: Arc<InflightBudget>,
        budgeted: &[&'static str],
    ) -> Self {
        Self(Arc::new(Limits {
            max_message_bytes,
            message_flag,
            budget,
            budgeted: budgeted.to_vec(),
        }))
    }

    /// The budget requests are charged to.
    pub fn budget(&self) -> &Arc<InflightBudget> {
        &self.0.budget
    }
}

impl<S> Layer<S> for IngressLayer {
    type Service = IngressService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IngressService {
            inner,
            limits: Arc::clone(&self.0),
        }
    }
}

/// The service [`IngressLayer`] makes.
#[derive(Debug, Clone)]
pub struct IngressService<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S> Service<http::Request<Body>> for IngressService<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let limits = &self.limits;
        let budget = limits
            .budgeted
            .contains(&parts.uri.path())
            .then(|| limits.budget.reserve());
        if let Some(budget) = &budget {
            parts.extensions.insert(budget.clone());
        }
        let body = Body::new(CheckedBody {
            inner: body,
            header: [0; HEADER_LEN],
            header_seen: 0,
            first_message_left: None,
            max_message_bytes: limits.max_message_bytes,
            message_flag: limits.message_flag,
            budget,
        });
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

/// A request body that checks the first message's declared size and charges the budget.
struct CheckedBody {
    inner: Body,
    header: [u8; HEADER_LEN],
    header_seen: usize,
    /// Bytes of the first message still to come, once its header was read (they were
    /// charged with the header).
    first_message_left: Option<usize>,
    max_message_bytes: usize,
    message_flag: &'static str,
    budget: Option<RequestBudget>,
}

impl CheckedBody {
    fn check(&mut self, mut data: &[u8]) -> Result<(), Status> {
        if self.header_seen < HEADER_LEN {
            let n = data.len().min(HEADER_LEN - self.header_seen);
            self.header[self.header_seen..self.header_seen + n].copy_from_slice(&data[..n]);
            self.header_seen += n;
            data.advance(n);
            if self.header_seen < HEADER_LEN {
                return Ok(());
            }
            let declared = u32::from_be_bytes([
                self.header[1],
                self.header[2],
                self.header[3],
                self.header[4],
            ]) as usize;
            if declared > self.max_message_bytes {
                return Err(Status::invalid_argument(format!(
                    "the request message is {declared} bytes; this server takes messages of at most {} bytes ({})",
                    self.max_message_bytes, self.message_flag
                )));
            }
            self.charge(HEADER_LEN + declared)?;
            self.first_message_left = Some(declared);
        }
        let mut more = data.len();
        if let Some(left) = &mut self.first_message_left {
            let in_first = more.min(*left);
            *left -= in_first;
            more -= in_first;
        }
        self.charge(more)
    }

    fn charge(&self, bytes: usize) -> Result<(), Status> {
        match &self.budget {
            Some(budget) => budget.charge(bytes).map_err(Status::resource_exhausted),
            None => Ok(()),
        }
    }
}

impl http_body::Body for CheckedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        if let Some(data) = frame.data_ref()
            && let Err(status) = this.check(data)
        {
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;
    use tonic::Code;

    const PREDICT: &str = "/tensorflow.serving.PredictionService/Predict";

    /// A gRPC body sent in `chunks`, as a client's frames would arrive.
    fn body(chunks: Vec<Vec<u8>>) -> Body {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from(c))));
        Body::new(StreamBody::new(futures::stream::iter(frames)))
    }

    /// One message of `len` bytes with its header.
    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    /// Sends `chunks` to `path` through the layer; the inner service reads the whole body
    /// as tonic would and answers the bytes read and the budget it saw, or the body's error.
    async fn send(
        layer: &IngressLayer,
        path: &str,
        chunks: Vec<Vec<u8>>,
    ) -> Result<(usize, Option<RequestBudget>), Status> {
        let inner = tower::service_fn(|req: http::Request<Body>| async move {
            let budget = req.extensions().get::<RequestBudget>().cloned();
            let read = req.into_body().collect().await.map(|b| b.to_bytes().len());
            Ok::<_, Infallible>(read.map(|n| (n, budget)))
        });
        let mut service = layer.layer(inner);
        let request = http::Request::builder()
            .uri(path)
            .body(body(chunks))
            .unwrap();
        service.call(request).await.unwrap()
    }

    fn layer(max: usize, budget: usize) -> IngressLayer {
        IngressLayer::new(
            max,
            "--max-message-size-bytes",
            InflightBudget::new(budget, "the test budget", "--max-inflight-bytes"),
            &[PREDICT],
        )
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_refused_from_its_header() {
        let layer = layer(100, 1 << 20);
        // Only the header and a few bytes arrive: the declared size alone decides.
        let mut head = message(101);
        head.truncate(8);
        let err = send(&layer, PREDICT, vec![head]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "the request message is 101 bytes; this server takes messages of at most 100 bytes (--max-message-size-bytes)"
        );
        assert_eq!(layer.budget().used(), 0);
        // At the limit, split anywhere (even inside the header), it passes whole.
        let m = message(100);
        let chunks = vec![
            m[..2].to_vec(),
            m[2..4].to_vec(),
            m[4..50].to_vec(),
            m[50..].to_vec(),
        ];
        let (read, budget) = send(&layer, PREDICT, chunks).await.unwrap();
        assert_eq!(read, 105);
        assert_eq!(budget.unwrap().held(), 105);
    }

    #[tokio::test]
    async fn predict_is_charged_while_it_is_held_and_shed_when_full() {
        let layer = layer(1000, 300);
        let (_, first) = send(&layer, PREDICT, vec![message(195)]).await.unwrap();
        let first = first.unwrap();
        assert_eq!(layer.budget().used(), 200);
        // 200 + 105 > 300: shed at the header, before the body is read.
        let err = send(&layer, PREDICT, vec![message(100)[..5].to_vec()])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(
            err.message().contains("the test budget is full")
                && err.message().contains("(--max-inflight-bytes)"),
            "{}",
            err.message()
        );
        // Other methods are not charged.
        let (_, none) = send(&layer, "/grpc.health.v1.Health/Check", vec![message(150)])
            .await
            .unwrap();
        assert!(none.is_none());
        drop(first);
        assert_eq!(layer.budget().used(), 0);
        let (_, again) = send(&layer, PREDICT, vec![message(100)]).await.unwrap();
        assert_eq!(again.unwrap().held(), 105);
    }

    #[tokio::test]
    async fn bytes_after_the_first_message_are_charged_as_they_come() {
        let layer = layer(1000, 1000);
        let mut two = message(10);
        two.extend(message(20));
        let (read, budget) = send(&layer, PREDICT, vec![two]).await.unwrap();
        assert_eq!((read, budget.unwrap().held()), (40, 40));
    }
}
