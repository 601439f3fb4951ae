//! What every Aspire binary's `main` sets up before it calls its library's `run`:
//! logging ([`init_logging`]) and the signal that starts a graceful shutdown
//! ([`shutdown_signal`]); and the Prometheus metrics each service records and serves on
//! `/metrics` ([`metrics`]). One place, so every service logs, measures and stops alike.

pub mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (colours only when stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`, the event's
    /// fields (`model`, `version`, `worker`, ...) at the top level, and `span` (the
    /// current span's name and fields) when there is one; for log pipelines.
    Json,
}

/// The logging flags every service takes.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct LogArgs {
    /// Log line format: `text`, or `json` for log pipelines (one object per line).
    #[arg(
        long = "log-format",
        visible_alias = "log_format",
        env = "ASPIRE_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

/// Logs to stderr with `tracing` in `format`, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        LogFormat::Json => json_logs(filter(), std::io::stderr).init(),
    }
}

/// The JSON subscriber of [`LogFormat::Json`], writing to `writer`.
fn json_logs<W>(
    filter: EnvFilter,
    writer: W,
) -> tracing_subscriber::fmt::SubscriberBuilder<
    tracing_subscriber::fmt::format::JsonFields,
    tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>,
    EnvFilter,
    W,
>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(writer)
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends before it kills a pod).
pub async fn shutdown_signal() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_level_target_message_and_fields() {
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let subscriber = json_logs(EnvFilter::new("info"), move || sink.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("load", worker = "w1");
            let _entered = span.enter();
            tracing::info!(model = "mnist", version = 2, "version AVAILABLE");
            tracing::debug!("filtered out");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line = lines[0];
        for wanted in [
            "\"level\":\"INFO\"",
            "\"target\":\"aspire_telemetry::tests\"",
            "\"message\":\"version AVAILABLE\"",
            "\"model\":\"mnist\"",
            "\"version\":2",
            "\"span\":{",
            "\"worker\":\"w1\"",
            "\"timestamp\":",
        ] {
            assert!(line.contains(wanted), "{wanted} not in {line}");
        }
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn the_flag_takes_both_spellings_and_refuses_others() {
        assert_eq!(Cli::parse_from(["x"]).log.log_format, LogFormat::Text);
        let json = Cli::parse_from(["x", "--log-format", "json"]);
        assert_eq!(json.log.log_format, LogFormat::Json);
        let snake = Cli::parse_from(["x", "--log_format=json"]);
        assert_eq!(snake.log.log_format, LogFormat::Json);
        let err = Cli::try_parse_from(["x", "--log-format", "xml"])
            .err()
            .expect("xml is refused")
            .to_string();
        assert!(err.contains("text") && err.contains("json"), "{err}");
    }
}
