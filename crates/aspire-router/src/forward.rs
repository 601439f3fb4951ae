//! Forwarding Predict: pick a worker from the routing table, send it the request as bytes
//! with the version made explicit, the client's metadata (less hop-by-hop headers) and
//! its remaining deadline, retry once on another worker with the same version when the
//! first one went away or shed the request (RESOURCE_EXHAUSTED, within a retry budget),
//! and hand back the worker's answer untouched.
//!
//! Client cancellation needs no code: when the client resets its stream, the server drops
//! this future, which drops the call to the worker, which resets that stream too.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aspire_core::Version;
use aspire_proto::serving::model_spec::VersionChoice;
use aspire_telemetry::metrics::{RequestMetrics, RouterMetrics};
use bytes::Bytes;
use tokio::time::Instant;
use tonic::Extensions;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};
use tower::retry::budget::{Budget, TpsBudget};

use crate::error::RouterError;
use crate::raw_codec::RawCodec;
use crate::routing_table::{RoutingTable, requested_version};
use crate::wire::{self, Forwarded, SplitRequest};
use crate::workers::WorkerHandle;

pub(crate) use aspire_ingress::PREDICT_PATH;

/// Request headers that belong to one hop, or that the router sets itself for the call to
/// the worker, and so are not forwarded.
const NOT_FORWARDED: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
    "te",
    "host",
    "grpc-timeout",
    "grpc-encoding",
    "grpc-accept-encoding",
];

/// Headers under this prefix are the router's own; a client's are dropped.
const OWN_HEADER_PREFIX: &str = "x-aspire-";

/// Retries of shed requests may add this share of the calls made in the last
/// [`RETRY_BUDGET_TTL`] (as linkerd's default)...
const RETRY_RATIO: f32 = 0.2;
/// ... plus this many per second, so that a quiet router can still retry.
const RETRY_FLOOR_PER_SEC: u32 = 10;
/// The window the budget counts calls over.
const RETRY_BUDGET_TTL: Duration = Duration::from_secs(10);

/// The retry budget a new router starts with.
pub(crate) fn retry_budget() -> TpsBudget {
    TpsBudget::new(RETRY_BUDGET_TTL, RETRY_FLOOR_PER_SEC, RETRY_RATIO)
}

/// What every request shares: the current routing table and the forwarding settings.
#[derive(Debug)]
pub(crate) struct Router {
    pub(crate) table: Arc<ArcSwap<RoutingTable>>,
    pub(crate) max_message_bytes: usize,
    /// How soon a worker marked down is first health-checked.
    pub(crate) probe_after: Duration,
    pub(crate) metrics: RouterMetrics,
    /// Bounds retries of shed requests, so that an overloaded fleet is not sent more.
    pub(crate) retry_budget: TpsBudget,
}

impl Router {
    /// Routes one Predict call. Errors are the router's own (bad request, no route) or
    /// the worker's status as it came.
    pub(crate) async fn predict(&self, request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let mut record = PredictRecord {
            metrics: &self.metrics,
            started: std::time::Instant::now(),
            route: None,
            code: Code::Cancelled as i32,
        };
        let answer = self.forward_predict(request, &mut record.route).await;
        record.code = answer.as_ref().map_or_else(|s| s.code() as i32, |_| 0);
        answer
    }

    /// [`Self::predict`]; `route` is set to the metrics of the route taken.
    async fn forward_predict(
        &self,
        request: Request<Bytes>,
        route: &mut Option<Arc<RequestMetrics>>,
    ) -> Result<Response<Bytes>, Status> {
        let deadline = client_deadline(request.metadata());
        let metadata = forwarded_metadata(request.metadata());
        let SplitRequest {
            mut model_spec,
            other_fields,
        } = wire::split_predict_request(request.get_ref())?;
        let wanted = requested_version(&model_spec)?;
        let (version, worker) = self.table.load().route(&model_spec.name, wanted)?;
        *route = Some(self.metrics.route(&model_spec.name, version.as_i64()));
        // Explicit, so the worker serves exactly what the router chose even if its own
        // view of the default version differs for a moment.
        model_spec.version_choice = Some(VersionChoice::Version(version.as_i64()));
        let message = Forwarded::new(&model_spec, other_fields.clone());

        self.retry_budget.deposit();
        let failure = match self
            .call(&worker, message.clone(), &metadata, deadline)
            .await
        {
            Err(status) if worker_went_away(&status) => status,
            Err(shed) if shed.code() == Code::ResourceExhausted => {
                return self
                    .retry_shed(
                        shed,
                        &worker,
                        &model_spec.name,
                        version,
                        message,
                        &metadata,
                        deadline,
                    )
                    .await;
            }
            answer => return answer,
        };
        self.mark_down(&worker, failure.message());
        let table = self.table.load();
        let (message, version, other) = match table.route_exact(&model_spec.name, version, &worker)
        {
            Some(other) => (message, version, other),
            // No other worker has that version (another may still be loading it): a
            // request that named no version may go wherever the default rule now
            // points, among the live workers.
            None if wanted.is_none() => match table.route(&model_spec.name, None) {
                Ok((v, other)) => {
                    model_spec.version_choice = Some(VersionChoice::Version(v.as_i64()));
                    *route = Some(self.metrics.route(&model_spec.name, v.as_i64()));
                    (Forwarded::new(&model_spec, other_fields), v, other)
                }
                Err(_) => return Err(went_away(&worker, &failure)),
            },
            None => return Err(went_away(&worker, &failure)),
        };
        drop(table);
        self.metrics.retried();
        tracing::debug!(
            from = %worker.id, to = %other.id, model = %model_spec.name, %version,
            "retrying Predict on another worker: {}", failure.message()
        );
        match self.call(&other, message, &metadata, deadline).await {
            Err(status) if worker_went_away(&status) => {
                self.mark_down(&other, status.message());
                Err(went_away(&other, &status))
            }
            answer => answer,
        }
    }

    /// A worker shed the request (RESOURCE_EXHAUSTED: its in-flight budget or queue is
    /// full): tries once more on another live worker with the same version, if the retry
    /// budget allows; otherwise, or if no other worker has it, the client gets the shed
    /// status. The worker is not marked down: it is busy, not gone.
    #[allow(clippy::too_many_arguments)]
    async fn retry_shed(
        &self,
        shed: Status,
        worker: &Arc<WorkerHandle>,
        model: &str,
        version: Version,
        message: Forwarded,
        metadata: &MetadataMap,
        deadline: Option<Instant>,
    ) -> Result<Response<Bytes>, Status> {
        let Some(other) = self.table.load().route_exact(model, version, worker) else {
            return Err(shed);
        };
        if !self.retry_budget.withdraw() {
            tracing::debug!(worker = %worker.id, "retry budget spent; not retrying a shed request");
            return Err(shed);
        }
        self.metrics.retried();
        tracing::debug!(
            from = %worker.id, to = %other.id, %model, %version,
            "retrying a shed Predict on another worker: {}", shed.message()
        );
        match self.call(&other, message, metadata, deadline).await {
            Err(status) if worker_went_away(&status) => {
                self.mark_down(&other, status.message());
                Err(went_away(&other, &status))
            }
            answer => answer,
        }
    }

    /// Marks `worker` down, counting it if it was live. (Two calls failing on it at once
    /// may both count it: the flag is read before it is set.)
    fn mark_down(&self, worker: &Arc<WorkerHandle>, why: &str) {
        if worker.is_live() {
            self.metrics.worker_marked_down();
        }
        worker.mark_down(why, self.probe_after);
    }

    async fn call(
        &self,
        worker: &WorkerHandle,
        message: Forwarded,
        metadata: &MetadataMap,
        deadline: Option<Instant>,
    ) -> Result<Response<Bytes>, Status> {
        let endpoint = &worker.endpoint;
        let _in_flight = endpoint.start_call();
        let mut request = Request::from_parts(metadata.clone(), Extensions::default(), message);
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RouterError::DeadlineExceeded(
                    "the deadline passed before the request could be sent to a worker".into(),
                )
                .into());
            }
            request.set_timeout(left);
        }
        let mut grpc = tonic::client::Grpc::new(endpoint.channel.clone())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("connection not ready: {e}")))?;
        grpc.unary(
            request,
            PathAndQuery::from_static(PREDICT_PATH),
            RawCodec::<Forwarded>::new(),
        )
        .await
    }
}

/// Counts one Predict when dropped: with its code, or as CANCELLED if the client went
/// away first (the server then drops the call's future before it finishes).
struct PredictRecord<'a> {
    metrics: &'a RouterMetrics,
    started: std::time::Instant,
    /// The route taken; `None` counts the request with empty labels.
    route: Option<Arc<RequestMetrics>>,
    code: i32,
}

impl Drop for PredictRecord<'_> {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        match &self.route {
            Some(route) => route.record(self.code, elapsed),
            None => self.metrics.unresolved().record(self.code, elapsed),
        }
    }
}

/// Whether a call failed because the worker is gone rather than because of the request:
/// UNAVAILABLE (refused connection, or a worker shutting down), or a status tonic made
/// from a broken connection. Statuses a worker sends carry no source; those tonic makes
/// from transport errors do.
fn worker_went_away(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        // A connection that closes under the call (a worker refusing the router's TLS
        // client certificate after the handshake, under TLS 1.3) comes as CANCELLED.
        Code::Unknown | Code::Internal | Code::Cancelled => status.source().is_some(),
        _ => false,
    }
}

/// The status a client gets when the worker (and the retry) went away: UNAVAILABLE,
/// naming the worker.
fn went_away(worker: &WorkerHandle, status: &Status) -> Status {
    Status::unavailable(format!(
        "worker '{}' at {} failed: {}",
        worker.id,
        worker.endpoint.address,
        status.message()
    ))
}

/// The client's metadata to send on to the worker: every header but those of this hop
/// and the router's own.
fn forwarded_metadata(metadata: &MetadataMap) -> MetadataMap {
    let mut headers = metadata.clone().into_headers();
    for name in NOT_FORWARDED {
        headers.remove(name);
    }
    let own: Vec<_> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(OWN_HEADER_PREFIX))
        .cloned()
        .collect();
    for name in own {
        headers.remove(name);
    }
    MetadataMap::from_headers(headers)
}

/// The client's deadline, from its `grpc-timeout` header.
fn client_deadline(metadata: &MetadataMap) -> Option<Instant> {
    let raw = metadata
        .get(aspire_proto::grpc_timeout::HEADER)?
        .to_str()
        .ok()?;
    aspire_proto::grpc_timeout::parse(raw).map(|d| Instant::now() + d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_failures_mean_the_worker_went_away() {
        assert!(worker_went_away(&Status::unavailable("refused")));
        // Sent by a worker: no source, so the request is at fault, not the worker.
        assert!(!worker_went_away(&Status::unknown("model raised")));
        assert!(!worker_went_away(&Status::internal("model failed")));
        assert!(!worker_went_away(&Status::invalid_argument("bad shape")));
        assert!(!worker_went_away(&Status::resource_exhausted("queue full")));
        assert!(!worker_went_away(&Status::deadline_exceeded("late")));
        assert!(!worker_went_away(&Status::cancelled("sent by the worker")));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let broken = Status::from_error(Box::new(io));
        assert!(worker_went_away(&broken), "{broken:?}");
    }

    #[test]
    fn client_metadata_goes_on_without_hop_headers() {
        let mut m = MetadataMap::new();
        m.insert("authorization", "Bearer t".parse().unwrap());
        m.insert("x-request-id", "r-1".parse().unwrap());
        m.insert("traceparent", "00-ab-cd-01".parse().unwrap());
        m.insert("grpc-timeout", "5S".parse().unwrap());
        m.insert("te", "trailers".parse().unwrap());
        m.insert("connection", "keep-alive".parse().unwrap());
        m.insert("x-aspire-chosen", "1".parse().unwrap());
        m.insert_bin(
            "trace-proto-bin",
            tonic::metadata::MetadataValue::from_bytes(b"\x00\x01"),
        );
        let f = forwarded_metadata(&m);
        let mut keys: Vec<_> = f
            .keys()
            .map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => k.as_str().to_string(),
                tonic::metadata::KeyRef::Binary(k) => k.as_str().to_string(),
            })
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "authorization",
                "trace-proto-bin",
                "traceparent",
                "x-request-id"
            ]
        );
        assert_eq!(f.get("x-request-id").unwrap(), "r-1");
    }

    #[test]
    fn the_retry_budget_allows_a_floor_plus_a_share_of_calls() {
        let budget = retry_budget();
        // With no calls, only the floor: 10 per second over the 10 s window.
        let floor = (0..1000).take_while(|_| budget.withdraw()).count();
        assert_eq!(floor, 100, "floor");
        // Every call deposits a fifth of a retry.
        for _ in 0..50 {
            budget.deposit();
        }
        let share = (0..1000).take_while(|_| budget.withdraw()).count();
        assert_eq!(share, 10, "share");
    }
}
