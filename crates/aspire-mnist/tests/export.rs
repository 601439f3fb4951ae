//! Training and exporting with real LibTorch on the real data: more iterations give a
//! lower test error, the export loads and serves any batch size, versions are never
//! overwritten.

use std::fs;
use std::path::{Path, PathBuf};

use aspire_core::{SignatureMap, Version};
use aspire_mnist::export::{self, INPUT_NAME, OUTPUT_NAME, SIGNATURE_NAME};
use aspire_mnist::{Error, ExportOptions, data, train_and_export};
use tch::{CModule, Kind, Tensor};

fn data_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist_5k.csv.gz")
}

fn options(export_dir: &Path, version: u64, iterations: usize) -> ExportOptions {
    let mut opts = ExportOptions::new(export_dir, Version::new(version).unwrap());
    opts.data = data_path();
    opts.training_iterations = iterations;
    opts
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Scores of `module` for the first `n` test images; checks shape and that rows sum to 1.
fn scores(module: &CModule, images: &Tensor, n: i64) -> Tensor {
    let out = tch::no_grad(|| module.forward_ts(&[images.narrow(0, 0, n)])).unwrap();
    assert_eq!(out.size(), vec![n, 10], "batch {n}");
    assert_eq!(out.kind(), Kind::Float);
    let sums = out.sum_dim_intlist(-1, false, Kind::Float);
    let worst = (sums - 1.0).abs().max().double_value(&[]);
    assert!(
        worst < 1e-5,
        "batch {n}: a row of scores sums to 1 ± {worst}"
    );
    out
}

// One test trains everything: tch::manual_seed and the generator are process-wide, so
// training in parallel tests would make the runs depend on each other's timing.
#[test]
fn more_iterations_lower_the_test_error_and_the_export_serves_any_batch_size() {
    let dir = tempfile::tempdir().unwrap();

    let short = train_and_export(&options(dir.path(), 1, 100)).unwrap();
    let long = train_and_export(&options(dir.path(), 2, 2000)).unwrap();
    let again = train_and_export(&options(dir.path(), 3, 100)).unwrap();
    for r in [&short, &long] {
        println!(
            "{:>5} iterations: test accuracy {:.1}%, loss {:.4}, trained in {:.2} s",
            r.training_iterations,
            r.test_accuracy * 100.0,
            r.final_loss,
            r.training_time.as_secs_f64()
        );
    }
    assert!(
        short.test_accuracy > 0.80,
        "100 iterations: {}",
        short.test_accuracy
    );
    assert!(
        long.test_error_rate() + 0.02 < short.test_error_rate(),
        "2000 iterations should clearly beat 100: error {:.3} vs {:.3}",
        long.test_error_rate(),
        short.test_error_rate()
    );
    assert_eq!(
        short.test_accuracy, again.test_accuracy,
        "same seed, same model"
    );

    // Only complete version folders, no temporary leftovers.
    assert_eq!(entries(dir.path()), ["1", "2", "3"]);
    for v in ["1", "2", "3"] {
        assert_eq!(entries(&dir.path().join(v)), ["model.pt", "signature.json"]);
    }

    let test = data::load(&data_path()).unwrap().test;
    let (images, labels) = export::to_tensors(&test);
    let model = CModule::load(long.version_dir.join("model.pt")).unwrap();
    // Tracing records shapes; a batch size baked into the graph would break these.
    let mut first_rows = Vec::new();
    for n in [1, 3, 7, 32, 1000] {
        let out = scores(&model, &images, n);
        first_rows.push(out.get(0));
    }
    for row in &first_rows[1..] {
        assert!(row.allclose(&first_rows[0], 1e-6, 1e-6, false));
    }
    // The loaded file computes what the report measured on the traced module.
    let accuracy = export::accuracy(&scores(&model, &images, 1000), &labels);
    assert_eq!(accuracy, long.test_accuracy);

    let reloaded_1 = CModule::load(short.version_dir.join("model.pt")).unwrap();
    let reloaded_3 = CModule::load(again.version_dir.join("model.pt")).unwrap();
    assert!(scores(&reloaded_1, &images, 32).equal(&scores(&reloaded_3, &images, 32)));

    let json = fs::read(long.version_dir.join("signature.json")).unwrap();
    let map = SignatureMap::from_json(&json).unwrap();
    let (name, sig) = map.resolve("").unwrap();
    assert_eq!(name, SIGNATURE_NAME);
    assert_eq!(sig.method, "forward");
    assert_eq!(sig.input(INPUT_NAME).unwrap().shape, Some(vec![-1, 784]));
    assert_eq!(sig.output(OUTPUT_NAME).unwrap().shape, Some(vec![-1, 10]));
}

#[test]
fn export_refuses_to_overwrite_an_existing_version() {
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("4");
    fs::create_dir(&existing).unwrap();
    fs::write(existing.join("model.pt"), b"serving").unwrap();

    let err = train_and_export(&options(dir.path(), 4, 10)).unwrap_err();
    assert!(matches!(err, Error::VersionExists { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&existing.display().to_string()),
        "{message}"
    );
    assert!(message.contains("refusing to overwrite"), "{message}");
    assert_eq!(fs::read(existing.join("model.pt")).unwrap(), b"serving");
    assert_eq!(entries(dir.path()), ["4"]);
}

#[test]
fn missing_data_says_to_run_make_setup() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path(), 1, 10);
    opts.data = dir.path().join("absent.csv.gz");
    let message = train_and_export(&opts).unwrap_err().to_string();
    assert!(
        message.contains("absent.csv.gz") && message.contains("make setup"),
        "{message}"
    );
    assert!(entries(dir.path()).is_empty());
}
