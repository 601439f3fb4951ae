//! `mnist-client`: sends MNIST test images to a TensorFlow Serving-compatible server and
//! prints the inference error rate, like TensorFlow Serving's `mnist_client.py`. Exits
//! non-zero if any RPC failed or returned an unusable answer.

use std::process::ExitCode;

use aspire_mnist::client::format_error_rate;
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let opts = aspire_mnist::ClientOptions::parse();
    let report = match aspire_mnist::run_client(&opts).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!("mnist-client: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", format_error_rate(report.error_rate()));
    println!("{}", report.counts_line());
    if let Some(first) = &report.first_failure {
        eprintln!("first failure: {first}");
    }
    if report.all_answered() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
