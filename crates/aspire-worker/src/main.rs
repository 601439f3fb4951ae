//! `aspire-worker` binary: parses flags, starts logging, connects to etcd and runs
//! [`aspire_worker::app::run_worker`].

use std::sync::Arc;

use anyhow::Context;
use aspire_worker::app::{WorkerCli, run_worker};
use clap::Parser;

/// mimalloc for Rust's allocations: glibc's malloc and free took about a tenth of this
/// process's CPU under load (see BENCHMARKS.md). LibTorch keeps its own allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = WorkerCli::parse();
    aspire_telemetry::init_logging(cli.log.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.serving.runtime_threads())
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", cli.host, cli.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--host, --port)"))?;
        let settings = cli.settings(listener.local_addr()?)?;
        let registry = Arc::new(cli.etcd.connect().await?);
        let result = run_worker(
            settings,
            registry.clone(),
            listener,
            aspire_telemetry::shutdown_signal(),
        )
        .await;
        // Revoking the lease removes anything this worker left registered at once.
        let _ = registry.close().await;
        Ok(result?)
    })
}
