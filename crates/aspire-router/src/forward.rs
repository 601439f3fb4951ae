//! Forwarding Predict: pick a worker from the routing table, send it the request as bytes
//! with the version made explicit, the client's metadata (less hop-by-hop headers) and
//! its remaining deadline, retry once on another worker with the same version when the
//! first one went away or shed the request (RESOURCE_EXHAUSTED, within a retry budget),
//! and hand back the worker's answer untouched (less the router's own `x-aspire-*`
//! trailers). A worker that answers that it is unloading the version it was sent is not
//! taken for gone: the request is sent again to the default version it names, or to
//! another worker (at most [`MAX_REPICKS`] times). A request without a deadline is held
//! to `--request-timeout-ms`.
//!
//! Client cancellation needs no code: when the client resets its stream, the server drops
//! this future, which drops the call to the worker, which resets that stream too.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aspire_core::Version;
use aspire_core::hop::{DEFAULT_VERSION_TRAILER, FORWARDED_HEADER, UNLOADING_TRAILER};
use aspire_proto::serving::ModelSpec;
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
use crate::wire::{self, Forwarded, OtherFields, SplitRequest};
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

/// Headers under this prefix are the router's own; a client's are dropped, and a
/// worker's are never handed back.
const OWN_HEADER_PREFIX: &str = aspire_core::hop::OWN_PREFIX;

/// How many times one request is sent again after a worker answered that it is
/// unloading the version it was sent.
const MAX_REPICKS: usize = 2;

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
    /// `--request-timeout-ms` for requests without a deadline; `None` for no limit.
    pub(crate) request_timeout: Option<Duration>,
    /// Bounds retries of shed requests, so that an overloaded fleet is not sent more.
    pub(crate) retry_budget: TpsBudget,
}

impl Router {
    /// Routes one Predict call. Errors are the router's own (bad request, no route,
    /// `--request-timeout-ms`) or the worker's status as it came, less the router's own
    /// `x-aspire-*` trailers.
    pub(crate) async fn predict(&self, request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let mut record = PredictRecord {
            metrics: &self.metrics,
            started: std::time::Instant::now(),
            route: None,
            code: Code::Cancelled as i32,
        };
        let deadline = client_deadline(request.metadata());
        let forward = self.forward_predict(request, deadline, &mut record.route);
        let answer = match (deadline, self.request_timeout) {
            // The client's own deadline is used as it is (and sent on to the worker).
            (None, Some(limit)) => tokio::time::timeout(limit, forward)
                .await
                .unwrap_or_else(|_| Err(timed_out(limit))),
            _ => forward.await,
        };
        let answer = answer.map(for_client).map_err(status_for_client);
        record.code = answer.as_ref().map_or_else(|s| s.code() as i32, |_| 0);
        answer
    }

    /// [`Self::predict`]; `route` is set to the metrics of the route taken. A worker
    /// that answers that it is unloading the version it was sent (the router's view of
    /// the registry lags) is not marked down: the request goes to the default version
    /// it names, or to another worker, at most [`MAX_REPICKS`] times.
    async fn forward_predict(
        &self,
        request: Request<Bytes>,
        deadline: Option<Instant>,
        route: &mut Option<Arc<RequestMetrics>>,
    ) -> Result<Response<Bytes>, Status> {
        let mut metadata = forwarded_metadata(request.metadata());
        metadata.insert(
            FORWARDED_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        let SplitRequest {
            model_spec,
            other_fields,
        } = wire::split_predict_request(request.get_ref())?;
        let wanted = requested_version(&model_spec)?;
        let (version, worker) = self.table.load().route(&model_spec.name, wanted)?;
        let mut call = Call {
            model_spec,
            other_fields,
            wanted,
            version,
            worker,
        };
        *route = Some(self.metrics.route(&call.model_spec.name, version.as_i64()));
        let mut repicks = 0;
        loop {
            let answer = self.send(&mut call, &metadata, deadline, route).await;
            let Some(unloading) = answer.as_ref().err().and_then(Unloading::from_status) else {
                return answer;
            };
            let model = call.model_spec.name.as_str();
            if repicks == MAX_REPICKS {
                return Err(self.repicks_spent(&call, &unloading));
            }
            repicks += 1;
            self.metrics.repicked();
            tracing::debug!(
                worker = %call.worker.id, %model, version = %call.version,
                default = ?unloading.default_version,
                "worker is unloading the version it was sent; picking again"
            );
            let table = self.table.load();
            match call.wanted {
                None => match unloading.default_version.filter(|d| *d != call.version) {
                    // The same worker, at the version it would serve now.
                    Some(default) => call.version = default,
                    None => {
                        let (v, w) = table.route_elsewhere(model, &call.worker)?;
                        (call.version, call.worker) = (v, w);
                    }
                },
                Some(v) => match table.route_exact(model, v, &call.worker) {
                    Some(other) => call.worker = other,
                    None => return Err(unloaded_everywhere(&table, model, v).into()),
                },
            }
            *route = Some(self.metrics.route(model, call.version.as_i64()));
        }
    }

    /// The client's answer once [`MAX_REPICKS`] re-picks all met versions being
    /// unloaded: NOT_FOUND for a version the client named, else UNAVAILABLE (the
    /// cluster is mid-rollout; a retry will find the new version).
    fn repicks_spent(&self, call: &Call, unloading: &Unloading) -> Status {
        let model = call.model_spec.name.as_str();
        match call.wanted {
            Some(v) => unloaded_everywhere(&self.table.load(), model, v).into(),
            None => RouterError::NoLiveWorker(format!(
                "model '{model}': each of {} tries met a worker unloading the version it was sent \
                 (last: version {} on worker '{}'); the cluster is changing versions, retry shortly",
                MAX_REPICKS + 1,
                unloading.version,
                call.worker.id
            ))
            .into(),
        }
    }

    /// Sends `call` to its worker; on failure, retries once as a worker that went away
    /// or shed the request calls for, updating `call` to the worker (and version) that
    /// answered last.
    async fn send(
        &self,
        call: &mut Call,
        metadata: &MetadataMap,
        deadline: Option<Instant>,
        route: &mut Option<Arc<RequestMetrics>>,
    ) -> Result<Response<Bytes>, Status> {
        let message = call.message();
        let model = call.model_spec.name.clone();
        let (version, worker) = (call.version, Arc::clone(&call.worker));
        self.retry_budget.deposit();
        let failure = match self
            .call(&worker, message.clone(), metadata, deadline)
            .await
        {
            Err(status) if worker_went_away(&status) => status,
            Err(shed) if shed.code() == Code::ResourceExhausted => {
                return self
                    .retry_shed(shed, call, message, metadata, deadline)
                    .await;
            }
            answer => return answer,
        };
        self.mark_down(&worker, failure.message());
        let table = self.table.load();
        let other = match table.route_exact(&model, version, &worker) {
            Some(other) => other,
            // No other worker has that version (another may still be loading it): a
            // request that named no version may go wherever the default rule now
            // points, among the live workers.
            None if call.wanted.is_none() => match table.route(&model, None) {
                Ok((v, other)) => {
                    call.version = v;
                    *route = Some(self.metrics.route(&model, v.as_i64()));
                    other
                }
                Err(_) => return Err(went_away(&worker, &failure)),
            },
            None => return Err(went_away(&worker, &failure)),
        };
        drop(table);
        call.worker = Arc::clone(&other);
        self.metrics.retried();
        tracing::debug!(
            from = %worker.id, to = %other.id, %model, version = %call.version,
            "retrying Predict on another worker: {}", failure.message()
        );
        match self.call(&other, call.message(), metadata, deadline).await {
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
    async fn retry_shed(
        &self,
        shed: Status,
        call: &mut Call,
        message: Forwarded,
        metadata: &MetadataMap,
        deadline: Option<Instant>,
    ) -> Result<Response<Bytes>, Status> {
        let (model, version, worker) = (
            call.model_spec.name.as_str(),
            call.version,
            Arc::clone(&call.worker),
        );
        let Some(other) = self.table.load().route_exact(model, version, &worker) else {
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
        call.worker = Arc::clone(&other);
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

/// One Predict on its way: what is sent, and where it goes now.
struct Call {
    /// The client's `model_spec`; its version is set to [`Self::version`] when sent.
    model_spec: ModelSpec,
    /// The request's other fields, as bytes.
    other_fields: OtherFields,
    /// The version the client named, if any.
    wanted: Option<Version>,
    version: Version,
    worker: Arc<WorkerHandle>,
}

impl Call {
    /// The message for the worker, with the version made explicit, so that the worker
    /// serves exactly what the router chose even if its own view of the default differs
    /// for a moment.
    fn message(&mut self) -> Forwarded {
        self.model_spec.version_choice = Some(VersionChoice::Version(self.version.as_i64()));
        Forwarded::new(&self.model_spec, self.other_fields.clone())
    }
}

/// A worker's "version unloading" answer, read from its trailers.
#[derive(Debug, PartialEq)]
struct Unloading {
    /// The version it was sent and is unloading.
    version: Version,
    /// What it would serve to a request that names none, if anything.
    default_version: Option<Version>,
}

impl Unloading {
    /// The answer in `status`, when it is one (UNAVAILABLE with [`UNLOADING_TRAILER`]).
    fn from_status(status: &Status) -> Option<Self> {
        if status.code() != Code::Unavailable {
            return None;
        }
        let version = trailer_version(status, UNLOADING_TRAILER)?;
        Some(Self {
            version,
            default_version: trailer_version(status, DEFAULT_VERSION_TRAILER),
        })
    }
}

fn trailer_version(status: &Status, name: &str) -> Option<Version> {
    let text = status.metadata().get(name)?.to_str().ok()?;
    Version::from_i64(text.trim().parse().ok()?)
}

/// NOT_FOUND for `version`, which the client named, when no live worker but those
/// unloading it has it.
fn unloaded_everywhere(table: &RoutingTable, model: &str, version: Version) -> RouterError {
    match table.model(model) {
        Ok(routes) => RouterError::VersionNotFound {
            model: routes.name.clone(),
            what: format!("version {version} is being unloaded and no other worker has it"),
            available: routes.live_versions(),
        },
        Err(e) => e,
    }
}

/// DEADLINE_EXCEEDED for a request without a deadline that ran past `limit`.
fn timed_out(limit: Duration) -> Status {
    RouterError::DeadlineExceeded(format!(
        "no answer within {} ms, the router's limit for a request without a deadline \
         (--request-timeout-ms); set a deadline on the call, or raise the flag (0: no limit)",
        limit.as_millis()
    ))
    .into()
}

/// `status` less the router's own metadata (`x-aspire-*`), which clients never see.
fn status_for_client(mut status: Status) -> Status {
    strip_own(status.metadata_mut());
    status
}

/// A worker's answer less the router's own metadata.
fn for_client(mut response: Response<Bytes>) -> Response<Bytes> {
    strip_own(response.metadata_mut());
    response
}

fn strip_own(metadata: &mut MetadataMap) {
    let own: Vec<String> = metadata
        .keys()
        .map(|k| match k {
            tonic::metadata::KeyRef::Ascii(k) => k.as_str(),
            tonic::metadata::KeyRef::Binary(k) => k.as_str(),
        })
        .filter(|k| k.starts_with(OWN_HEADER_PREFIX))
        .map(str::to_string)
        .collect();
    for name in own {
        metadata.remove(name.as_str());
        metadata.remove_bin(name.as_str());
    }
}

/// Whether a call failed because the worker is gone rather than because of the request:
/// UNAVAILABLE (refused connection, or a worker shutting down), or a status tonic made
/// from a broken connection. Statuses a worker sends carry no source; those tonic makes
/// from transport errors do.
fn worker_went_away(status: &Status) -> bool {
    match status.code() {
        // A worker unloading the version it was sent is up: the router's view lags.
        Code::Unavailable => Unloading::from_status(status).is_none(),
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
