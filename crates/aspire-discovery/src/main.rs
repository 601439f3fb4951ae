//! `aspire-discovery` binary: polls model storage and publishes available and aspired
//! versions to etcd, with `tensorflow_model_server`'s model flags.

use std::sync::Arc;

use aspire_discovery::service::{ModelArgs, run};
use aspire_registry::cli::EtcdArgs;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// `aspire-discovery`'s flags.
#[derive(Debug, Parser)]
#[command(
    name = "aspire-discovery",
    version,
    about = "Publish the model versions found in storage to etcd"
)]
struct Cli {
    #[command(flatten)]
    models: ModelArgs,
    #[command(flatten)]
    etcd: EtcdArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = DiscoveryCli::parse();
    aspire_telemetry::init_logging();
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
