//! `mnist-export`: trains the MNIST classifier and exports it as a TorchScript model
//! version, like TensorFlow Serving's `mnist_saved_model.py`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let opts = aspire_mnist::ExportOptions::parse();
    match aspire_mnist::train_and_export(&opts) {
        Ok(report) => {
            println!(
                "Trained {} iterations (batches of {}) in {:.2} s: loss {:.4}, test accuracy {:.1}%",
                report.training_iterations,
                opts.batch_size,
                report.training_time.as_secs_f64(),
                report.final_loss,
                report.test_accuracy * 100.0,
            );
            println!("Exported model to {}", report.version_dir.display());
            ExitCode::SUCCESS
        }
        // The error is a sentence for the user; a backtrace would only bury it.
        Err(e) => {
            eprintln!("mnist-export: {e}");
            ExitCode::FAILURE
        }
    }
}
