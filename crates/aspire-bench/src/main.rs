//! `aspire-bench` binary: parses the command line and runs [`aspire_bench::run`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = aspire_bench::Cli::parse();
    match aspire_bench::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The error is a sentence for the user; a backtrace would only bury it.
        Err(e) => {
            eprintln!("aspire-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
