//! `mnist-export`: trains the MNIST classifier and exports it as a TorchScript model
//! version, like TensorFlow Serving's `mnist_saved_model.py`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let opts = aspire_mnist::ExportOptions::parse();
    println!(
        "Training for {} iterations (batches of {}) ...",
        opts.training_iterations, opts.batch_size
    );
    let report = aspire_mnist::train_and_export(&opts)?;
    println!(
        "Done training in {:.2} s: loss {:.4}, test accuracy {:.1}% ({} training images)",
        report.training_time.as_secs_f64(),
        report.final_loss,
        report.test_accuracy * 100.0,
        report.train_images
    );
    println!("Exported model to {}", report.version_dir.display());
    Ok(())
}
