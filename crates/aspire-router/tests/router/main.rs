//! The router started in-process over real gRPC on loopback, against fake workers; the
//! tests assert on what crosses the wire.

mod common;
mod failover;
mod fake_worker;
mod forwarding;
mod lag;
mod metrics;
mod model_info;
mod routing;
