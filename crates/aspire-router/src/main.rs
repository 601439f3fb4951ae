//! `aspire-router` binary: parses flags, starts logging, connects to etcd and runs
//! [`aspire_router::run`].

use std::sync::Arc;

use anyhow::Context;
use aspire_core::keys::KeySchema;
use aspire_registry::{EtcdOptions, EtcdRegistry, Registry};
use aspire_router::{RouterConfig, bind, run};
use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let config = RouterConfig::parse();
    config.validate().map_err(anyhow::Error::msg)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime_threads())
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let registry = connect_registry(&config).await?;
        let listener = bind(&config).await?;
        run(config, registry, listener, shutdown_signal()).await
    })
}

async fn connect_registry(config: &RouterConfig) -> anyhow::Result<Arc<dyn Registry>> {
    let endpoints = config.endpoints();
    let registry = EtcdRegistry::connect(
        &endpoints,
        KeySchema::new(&config.prefix),
        EtcdOptions::default(),
    )
    .await
    .with_context(|| format!("--etcd-endpoints {}", endpoints.join(",")))?;
    Ok(Arc::new(registry))
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received");
}
