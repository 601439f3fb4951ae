//! `aspire-router` binary: parses flags, starts logging, connects to etcd and runs
//! [`aspire_router::run`].

use std::sync::Arc;

use aspire_registry::Registry;
use aspire_router::{RouterConfig, bind, run};
use aspire_telemetry::{init_logging, shutdown_signal};
use clap::Parser;

/// mimalloc for Rust's allocations: glibc's malloc and free took about a tenth of this
/// process's CPU under load (see BENCHMARKS.md). LibTorch keeps its own allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = RouterConfig::parse();
    config.validate().map_err(anyhow::Error::msg)?;
    init_logging(config.log.log_format);
    // One thread: tokio's current-thread scheduler, which queues a woken task behind
    // the others instead of running it at once, so HTTP/2 frames of several calls leave
    // in one write (measured: 2.6 times fewer writev calls at 32 callers).
    let runtime = match config.runtime_threads() {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        threads => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?,
    };
    runtime.block_on(async move {
        let registry: Arc<dyn Registry> = Arc::new(config.etcd.connect().await?);
        let listener = bind(&config).await?;
        run(config, registry, listener, shutdown_signal()).await
    })
}
