//! TLS and mTLS for Aspire's gRPC hops, on rustls with the aws-lc-rs provider only.
//!
//! - [`ssl_config`]: TensorFlow Serving's `--ssl_config_file` (a text-format
//!   `SSLConfig` with PEM fields), checked and turned into a rustls server config;
//! - [`reload`]: the current server config ([`ServerTls`]) and the poller that re-reads
//!   the file when it changes;
//! - [`incoming`]: the TLS accept loop whose connections tonic serves;
//! - [`client`]: the router's `--worker-tls-*` flags and its client TLS to workers;
//! - `pem`: PEM text to rustls types, shared by both sides;
//! - [`error`]: what went wrong, naming the file, field or flag;
//! - `testing` (feature `testing`): a throwaway CA and SSL config files for tests.

pub mod client;
pub mod error;
pub mod incoming;
mod pem;
pub mod reload;
pub mod ssl_config;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use client::{WorkerTlsArgs, worker_uri};
pub use error::TlsError;
pub use incoming::tls_incoming;
pub use pem::provider;
pub use reload::ServerTls;
