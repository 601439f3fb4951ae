//! `aspire-bench`: measures Aspire the way `make bench` reports it.
//!
//! - [`load`]: the closed-loop gRPC load generator (HdrHistogram latencies, CPU of the
//!   generator and of watched processes, the worker's metrics over the window);
//! - [`transport`]: the transport ceiling, a bare `PredictionService` that runs nothing;
//! - [`compute`]: the compute ceiling, the model's forward pass in-process with `tch`;
//! - [`report`]: the one table and the target checks, from the runs' JSON lines;
//! - [`request`]: the pre-encoded request and the bare server's response;
//! - [`codec`]: the bytes-in, bytes-out gRPC codec of the generator;
//! - [`soak`]: `make soak`, the whole stack under load through faults for minutes;
//! - [`proc_stat`]: process CPU time and resident memory from `/proc`;
//! - [`worker_metrics`]: scraping and differencing the worker's Prometheus metrics;
//! - [`cli`]: the subcommands;
//! - [`error`]: the crate's error.

pub mod cli;
pub mod codec;
pub mod compute;
pub mod error;
pub mod load;
pub mod proc_stat;
pub mod report;
pub mod request;
pub mod soak;
pub mod transport;
pub mod worker_metrics;

pub use cli::{Cli, run};
pub use error::{Error, Result};
