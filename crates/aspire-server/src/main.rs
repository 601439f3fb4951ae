//! `aspire-server` binary: parses flags, starts logging and runs [`aspire_server::run`].

use aspire_server::{Config, bind, run, tf_flags};
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let (args, unimplemented) = tf_flags::strip_unimplemented(std::env::args_os().collect());
    let config = Config::parse_from(args);
    aspire_telemetry::init_logging(config.log.log_format);
    for flag in unimplemented {
        tracing::warn!(
            "{flag}: this TensorFlow Serving flag is not implemented by aspire-server yet; ignoring it"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.serving.runtime_threads())
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = bind(&config).await?;
        run(config, listener, aspire_telemetry::shutdown_signal()).await
    })
}
