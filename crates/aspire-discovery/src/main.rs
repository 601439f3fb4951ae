//! `aspire-discovery` binary: polls model storage and publishes available and aspired
//! versions to etcd, with `tensorflow_model_server`'s model flags.

use std::sync::Arc;

use aspire_discovery::service::{DiscoveryCli, run};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = DiscoveryCli::parse();
    aspire_telemetry::init_logging(cli.log.log_format);
    let models = cli.models.models().map_err(anyhow::Error::msg)?;
    let registry = Arc::new(cli.etcd.connect().await?);
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(
        cli.models.clone(),
        models,
        registry.clone(),
        stop.clone(),
    ));
    aspire_telemetry::shutdown_signal().await;
    stop.cancel();
    let _ = task.await;
    let _ = registry.close().await;
    Ok(())
}
