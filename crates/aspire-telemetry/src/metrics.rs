//! Prometheus metrics: every metric name, label and bucket Aspire exports is defined
//! here, and so is the `/metrics` endpoint that serves them.
//!
//! Each service owns one [`Registry`] (not the process-wide default one), so tests can
//! run several services in one process and read each one's counts alone:
//!
//! - [`WorkerMetrics`] holds `aspire_worker_*`, for `aspire-worker` and `aspire-server`;
//! - [`RouterMetrics`] holds `aspire_router_*`;
//! - [`MetricsPort`] is what `--metrics-port` means, and binds it;
//! - [`MetricsServer`] is the HTTP endpoint (`GET /metrics`, Prometheus text format);
//! - [`scrape`] and [`sample`] read an endpoint back, for tests and tools.
//!
//! The request path only touches handles resolved in advance: a version's handles are
//! made when it loads (label values formatted once), and a request's gRPC code picks
//! its counter from a small array filled on first use. Recording a request is then a
//! few relaxed atomic adds, with no lock, allocation or formatting.

mod http;
mod router;
mod worker;

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};
use tokio::net::TcpListener;

pub use http::{MetricsServer, sample, scrape};
pub use prometheus::Registry;
pub use router::RouterMetrics;
pub use worker::{BatchMetrics, VersionMetrics, WorkerMetrics};

/// Latency buckets, in seconds: 100 µs to 10 s, about 2.5 per decade.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// gRPC status codes by number, spelled as grpc-go's `codes.Code.String()` (the label
/// values of go-grpc-prometheus, which dashboards for gRPC services expect).
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The label value of gRPC code number `code` (`tonic::Code as i32`); a number outside
/// the 17 codes is `Unknown`, as gRPC itself reads it.
pub fn grpc_code_name(code: i32) -> &'static str {
    CODE_NAMES[code_index(code)]
}

fn code_index(code: i32) -> usize {
    usize::try_from(code)
        .ok()
        .filter(|c| *c < CODE_NAMES.len())
        .unwrap_or(2)
}

/// The request counter and latency histogram of one (model, version) label pair. The
/// counter for each gRPC code is resolved on its first use and kept.
pub struct RequestMetrics {
    requests: IntCounterVec,
    model: Box<str>,
    version: Box<str>,
    by_code: [OnceLock<IntCounter>; CODE_NAMES.len()],
    duration: Histogram,
}

impl RequestMetrics {
    fn new(requests: &IntCounterVec, durations: &HistogramVec, model: &str, version: &str) -> Self {
        Self {
            requests: requests.clone(),
            model: model.into(),
            version: version.into(),
            by_code: Default::default(),
            duration: durations.with_label_values(&[model, version]),
        }
    }

    /// Counts one request answered with gRPC code number `code` (`tonic::Code as i32`;
    /// 0 is OK) after `elapsed`.
    pub fn record(&self, code: i32, elapsed: Duration) {
        self.counter(code).inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Makes the `OK` series exist (at 0) before the first request, so that rates over
    /// it are defined from the start.
    fn init_ok(self) -> Self {
        let _ = self.counter(0);
        self
    }

    fn counter(&self, code: i32) -> &IntCounter {
        let i = code_index(code);
        self.by_code[i].get_or_init(|| {
            self.requests
                .with_label_values(&[&*self.model, &*self.version, CODE_NAMES[i]])
        })
    }
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics")
            .field("model", &self.model)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// What a service's `--metrics-port` flag asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsPort {
    /// No endpoint: the flag is 0, or it is absent and the service's default is 0.
    Disabled,
    /// The flag is absent: the service's default port, best effort. When it is taken
    /// (two workers on one host, another exporter) the service logs an error and runs
    /// without the endpoint rather than refuse to serve.
    Default(u16),
    /// The flag is given: the service does not start unless it can listen there.
    Required(u16),
}

impl MetricsPort {
    /// Reads the flag: `None` when absent; `default` 0 means off unless asked for.
    pub fn from_flag(flag: Option<u16>, default: u16) -> Self {
        match flag {
            Some(0) => Self::Disabled,
            Some(port) => Self::Required(port),
            None if default == 0 => Self::Disabled,
            None => Self::Default(default),
        }
    }

    /// Listens on `ip` (the service's `--host`) at this port; `None` when disabled, or
    /// when the default port cannot be had (logged). The error names the flag.
    pub async fn bind(self, ip: IpAddr) -> Result<Option<TcpListener>, String> {
        let (port, required) = match self {
            Self::Disabled => return Ok(None),
            Self::Default(port) => (port, false),
            Self::Required(port) => (port, true),
        };
        let addr = SocketAddr::new(ip, port);
        match TcpListener::bind(addr).await {
            Ok(listener) => Ok(Some(listener)),
            Err(e) if required => Err(format!(
                "cannot serve metrics on {addr} (--metrics-port {port}): {e}"
            )),
            Err(e) => {
                tracing::error!(
                    "cannot serve metrics on {addr}, the default --metrics-port: {e}; \
                     running without /metrics (give each service on this host its own \
                     --metrics-port, or 0 to turn it off)"
                );
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_follow_grpc_numbers() {
        assert_eq!(grpc_code_name(0), "OK");
        assert_eq!(grpc_code_name(3), "InvalidArgument");
        assert_eq!(grpc_code_name(5), "NotFound");
        assert_eq!(grpc_code_name(14), "Unavailable");
        assert_eq!(grpc_code_name(16), "Unauthenticated");
        assert_eq!(grpc_code_name(17), "Unknown");
        assert_eq!(grpc_code_name(-1), "Unknown");
    }

    #[test]
    fn metrics_port_flag() {
        assert_eq!(
            MetricsPort::from_flag(None, 9501),
            MetricsPort::Default(9501)
        );
        assert_eq!(MetricsPort::from_flag(None, 0), MetricsPort::Disabled);
        assert_eq!(MetricsPort::from_flag(Some(0), 9501), MetricsPort::Disabled);
        assert_eq!(MetricsPort::from_flag(Some(7), 0), MetricsPort::Required(7));
    }

    #[tokio::test]
    async fn a_taken_port_fails_only_when_asked_for() {
        let ip: IpAddr = [127, 0, 0, 1].into();
        let taken = TcpListener::bind((ip, 0)).await.unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = MetricsPort::Required(port).bind(ip).await.unwrap_err();
        assert!(err.contains("--metrics-port"), "{err}");
        assert!(MetricsPort::Default(port).bind(ip).await.unwrap().is_none());
        assert!(MetricsPort::Disabled.bind(ip).await.unwrap().is_none());
    }
}
