//! `aspirectl` binary: parses the command line, connects to etcd, runs one command.

use aspirectl::{Cli, run};
use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = async {
        let registry = cli.etcd.connect().await?;
        run(&cli.command, &registry).await
    }
    .await;
    match result {
        Ok(text) => {
            println!("{}", text.trim_end());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aspirectl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
