//! The router's flags. Each is accepted in kebab-case and snake_case (TensorFlow Serving's
//! spelling) and falls back to an `ASPIRE_*` environment variable, named as for
//! `aspire-server` where the two share a flag; the etcd flags are the ones every clustered
//! binary takes ([`EtcdArgs`]).

use std::path::PathBuf;
use std::time::Duration;

use aspire_registry::cli::EtcdArgs;
use aspire_telemetry::metrics::MetricsPort;
use aspire_tls::WorkerTlsArgs;
use clap::Parser;

pub use aspire_ingress::DEFAULT_MAX_MESSAGE_BYTES;
use aspire_ingress::{DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_INFLIGHT_BYTES};

/// `--metrics-port` when not given: the default gRPC port (8500) plus 1000, as the
/// worker's is (9501 for 8501).
pub const DEFAULT_METRICS_PORT: u16 = 9500;

/// `--request-timeout-ms` when not given: a minute.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 60_000;

/// `aspire-router`'s flags.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "aspire-router",
    version,
    about = "Serve TensorFlow Serving's gRPC API in front of Aspire workers, routing each request to a live worker that has the right model version loaded"
)]
pub struct RouterConfig {
    /// Logging.
    #[command(flatten)]
    pub log: aspire_telemetry::LogArgs,
    /// gRPC port.
    #[arg(long, env = "ASPIRE_PORT", default_value_t = 8500)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = "ASPIRE_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Where etcd is and which key prefix to work under (`--lease-ttl` does not apply:
    /// the router registers nothing).
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Worker threads of the async runtime [default: half the CPUs this process may use,
    /// rounded up: forwarding is mostly the kernel's network work, and each extra runtime
    /// thread that parks and wakes per request costs more CPU than it adds].
    #[arg(
        long = "runtime-worker-threads",
        visible_alias = "runtime_worker_threads",
        env = "ASPIRE_RUNTIME_WORKER_THREADS"
    )]
    pub runtime_worker_threads: Option<usize>,
    /// Largest gRPC message accepted or sent, in bytes; a larger request is refused with
    /// INVALID_ARGUMENT from its header, before its body is read, and never forwarded.
    #[arg(long = "max-message-size-bytes", visible_alias = "max_message_size_bytes",
          env = "ASPIRE_MAX_MESSAGE_SIZE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_size_bytes: usize,
    /// Request bytes the router holds at once (received and not yet answered); a request
    /// that does not fit is shed at once with RESOURCE_EXHAUSTED.
    #[arg(long = "max-inflight-bytes", visible_alias = "max_inflight_bytes",
          env = "ASPIRE_MAX_INFLIGHT_BYTES", default_value_t = DEFAULT_MAX_INFLIGHT_BYTES)]
    pub max_inflight_bytes: usize,
    /// Requests one client HTTP/2 connection may have open at once; a client's further
    /// requests wait for a stream to finish.
    #[arg(long = "max-concurrent-streams", visible_alias = "max_concurrent_streams",
          env = "ASPIRE_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,
    /// How soon a worker marked down after a failed call is first health-checked, in
    /// milliseconds; the interval doubles after each failed check, up to 30 s.
    #[arg(
        long = "worker-probe-interval-ms",
        visible_alias = "worker_probe_interval_ms",
        env = "ASPIRE_WORKER_PROBE_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub worker_probe_interval_ms: u64,
    /// How long a Predict without a deadline of its own may take through the router,
    /// in milliseconds, re-picks and retries included; past it the client gets
    /// DEADLINE_EXCEEDED naming this flag. 0: no limit. A client's own deadline is used as
    /// it is.
    #[arg(
        long = "request-timeout-ms",
        visible_alias = "request_timeout_ms",
        env = "ASPIRE_REQUEST_TIMEOUT_MS",
        default_value_t = DEFAULT_REQUEST_TIMEOUT_MS
    )]
    pub request_timeout_ms: u64,
    /// Port for Prometheus metrics on /metrics, on the --host address; 0 turns them off
    /// [default: 9500, best effort: if it is taken, the router logs an error and runs
    /// without; a port given here must be free].
    #[arg(
        long = "metrics-port",
        visible_alias = "metrics_port",
        env = "ASPIRE_METRICS_PORT"
    )]
    pub metrics_port: Option<u16>,
    /// TensorFlow Serving's SSL config file (text-format `SSLConfig`: `server_key`,
    /// `server_cert`, `custom_ca` as PEM text, `client_verify`); given, clients must use
    /// TLS, and the file is re-read when it changes [default: plaintext].
    #[arg(
        long = "ssl-config-file",
        visible_alias = "ssl_config_file",
        env = "ASPIRE_SSL_CONFIG_FILE"
    )]
    pub ssl_config_file: Option<PathBuf>,
    /// TLS to workers.
    #[command(flatten)]
    pub worker_tls: WorkerTlsArgs,
}

impl RouterConfig {
    /// Checks the values clap cannot; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.etcd.etcd_endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err(
                "--etcd-endpoints is empty; give at least one, e.g. http://127.0.0.1:2379".into(),
            );
        }
        if self.runtime_worker_threads == Some(0) {
            return Err("--runtime-worker-threads must be at least 1".into());
        }
        aspire_ingress::check_limits(
            self.max_message_size_bytes,
            self.max_inflight_bytes,
            self.max_concurrent_streams,
        )?;
        if self.worker_probe_interval_ms == 0 {
            return Err("--worker-probe-interval-ms must be positive".into());
        }
        Ok(())
    }

    /// Threads for the async runtime.
    pub fn runtime_threads(&self) -> usize {
        self.runtime_worker_threads
            .unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2))
            })
            .max(1)
    }

    /// What [`Self::metrics_port`] asks for.
    pub fn metrics(&self) -> MetricsPort {
        MetricsPort::from_flag(self.metrics_port, DEFAULT_METRICS_PORT)
    }

    /// [`Self::request_timeout_ms`] as a duration; `None` for no limit (0).
    pub fn request_timeout(&self) -> Option<Duration> {
        (self.request_timeout_ms > 0).then(|| Duration::from_millis(self.request_timeout_ms))
    }

    /// [`Self::worker_probe_interval_ms`] as a duration.
    pub fn worker_probe_interval(&self) -> Duration {
        Duration::from_millis(self.worker_probe_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RouterConfig, clap::Error> {
        RouterConfig::try_parse_from(std::iter::once("aspire-router").chain(args.iter().copied()))
    }

    #[test]
    fn spellings_and_defaults() {
        let c = parse(&[
            "--etcd_endpoints",
            "http://a:2379,http://b:2379",
            "--max_message_size_bytes",
            "10",
            "--runtime_worker_threads=2",
        ])
        .unwrap();
        assert_eq!(
            c.etcd.etcd_endpoints,
            vec!["http://a:2379", "http://b:2379"]
        );
        assert_eq!(c.etcd.prefix, "/aspire");
        assert_eq!(c.port, 8500);
        assert_eq!(c.max_message_size_bytes, 10);
        assert_eq!(c.runtime_threads(), 2);
        assert_eq!(c.request_timeout(), Some(Duration::from_secs(60)));
        let c = parse(&["--request_timeout_ms=250"]).unwrap();
        assert_eq!(c.request_timeout(), Some(Duration::from_millis(250)));
        let c = parse(&["--request-timeout-ms", "0"]).unwrap();
        assert_eq!(c.request_timeout(), None);
        let c = parse(&[
            "--etcd-endpoints",
            "http://e:1",
            "--worker-probe-interval-ms",
            "5",
        ])
        .unwrap();
        assert_eq!(c.etcd.etcd_endpoints, vec!["http://e:1"]);
        assert_eq!(c.worker_probe_interval(), Duration::from_millis(5));
        assert!(c.validate().is_ok());
        assert_eq!(c.metrics(), MetricsPort::Default(DEFAULT_METRICS_PORT));
        let c = parse(&["--metrics_port=9"]).unwrap();
        assert_eq!(c.metrics(), MetricsPort::Required(9));
        let c = parse(&["--metrics-port", "0"]).unwrap();
        assert_eq!(c.metrics(), MetricsPort::Disabled);
    }

    #[test]
    fn invalid_values_name_the_flag() {
        for (args, flag) in [
            (
                &["--runtime-worker-threads", "0"][..],
                "--runtime-worker-threads",
            ),
            (
                &["--max-message-size-bytes", "0"][..],
                "--max-message-size-bytes",
            ),
            (&["--etcd-endpoints", " "][..], "--etcd-endpoints"),
            (
                &["--worker-probe-interval-ms", "0"][..],
                "--worker-probe-interval-ms",
            ),
        ] {
            let err = parse(args).unwrap().validate().unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        assert!(parse(&["--port", "x"]).is_err());
    }
}
