//! `mnist-export`: the equivalent of TensorFlow Serving's `mnist_saved_model.py`. Trains a
//! small classifier on the training split, traces it to TorchScript and writes
//! `<export_dir>/<version>/{model.pt,signature.json}` in one atomic rename.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aspire_core::{DType, Signature, SignatureMap, TensorSpec, Version};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{CModule, Device, Kind, Tensor};

use crate::data::{self, DATA_ENV, DEFAULT_DATA_PATH, NUM_CLASSES, PIXELS, Split};
use crate::error::{Error, Result};

/// Name of the signature TensorFlow Serving's MNIST model serves.
pub const SIGNATURE_NAME: &str = "predict_images";
/// Input name in that signature.
pub const INPUT_NAME: &str = "images";
/// Output name in that signature.
pub const OUTPUT_NAME: &str = "scores";
/// Units in the hidden layer.
pub const HIDDEN_UNITS: i64 = 128;

/// Options of `mnist-export` (TensorFlow's snake_case spellings are accepted too).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "mnist-export",
    about = "Train an MNIST classifier and export it as a TorchScript model version for Aspire"
)]
pub struct ExportOptions {
    /// Number of training iterations: one optimizer step on one minibatch each.
    #[arg(
        long = "training-iteration",
        visible_alias = "training_iteration",
        env = "ASPIRE_MNIST_EXPORT_TRAINING_ITERATION",
        default_value_t = 1000
    )]
    pub training_iterations: usize,
    /// Version number of the model; the export goes to `<export_dir>/<version>/`.
    #[arg(
        long = "model-version",
        visible_alias = "model_version",
        env = "ASPIRE_MNIST_EXPORT_MODEL_VERSION",
        default_value = "1"
    )]
    pub model_version: Version,
    /// The gzip'd MNIST CSV (`make setup` extracts it).
    #[arg(long, env = DATA_ENV, default_value = DEFAULT_DATA_PATH)]
    pub data: PathBuf,
    /// Images per minibatch.
    #[arg(
        long = "batch-size",
        env = "ASPIRE_MNIST_EXPORT_BATCH_SIZE",
        default_value_t = 50
    )]
    pub batch_size: usize,
    /// Adam's learning rate.
    #[arg(
        long = "learning-rate",
        env = "ASPIRE_MNIST_EXPORT_LEARNING_RATE",
        default_value_t = 1e-3
    )]
    pub learning_rate: f64,
    /// Seed for weight initialisation and minibatch order; the same seed gives the same model.
    #[arg(long, env = "ASPIRE_MNIST_EXPORT_SEED", default_value_t = 0)]
    pub seed: i64,
    /// LibTorch intra-op threads (0 leaves LibTorch's default, one per core).
    // Minibatches of 50 gain nothing from more than one, and on a busy machine extra
    // threads spin-wait: 2,000 iterations took 2 s with 1 thread, 58 s with 2 beside a compiler.
    #[arg(long, env = "ASPIRE_MNIST_EXPORT_THREADS", default_value_t = 1)]
    pub threads: usize,
    /// Folder that holds the model's version folders (created if missing).
    #[arg(env = "ASPIRE_MNIST_EXPORT_DIR")]
    pub export_dir: PathBuf,
}

impl ExportOptions {
    /// Options with the command line's defaults for `export_dir` and `version`.
    pub fn new(export_dir: impl Into<PathBuf>, model_version: Version) -> Self {
        Self {
            training_iterations: 1000,
            model_version,
            data: PathBuf::from(DEFAULT_DATA_PATH),
            batch_size: 50,
            learning_rate: 1e-3,
            seed: 0,
            threads: 1,
            export_dir: export_dir.into(),
        }
    }

    /// The folder the version will be written to.
    pub fn version_dir(&self) -> PathBuf {
        self.export_dir.join(self.model_version.to_string())
    }

    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::InvalidOption(
                "--batch-size is 0; it must be at least 1".into(),
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::InvalidOption(format!(
                "--learning-rate is {}; it must be a positive number",
                self.learning_rate
            )));
        }
        Ok(())
    }
}

/// What an export did.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The version folder that now holds `model.pt` and `signature.json`.
    pub version_dir: PathBuf,
    /// Training iterations run.
    pub training_iterations: usize,
    /// Images in the training split.
    pub train_images: usize,
    /// Mean cross-entropy over the last (up to) 50 minibatches.
    pub final_loss: f64,
    /// Fraction of the test split the exported (traced) model classifies correctly.
    pub test_accuracy: f64,
    /// Wall time spent training.
    pub training_time: Duration,
}

impl ExportReport {
    /// `1 - test_accuracy`.
    pub fn test_error_rate(&self) -> f64 {
        1.0 - self.test_accuracy
    }
}

/// The signatures of the exported model: TensorFlow Serving's MNIST `predict_images`.
pub fn signature_map() -> SignatureMap {
    let spec = |name: &str, width: usize| TensorSpec {
        name: name.to_string(),
        dtype: DType::F32,
        shape: Some(vec![-1, width as i64]),
    };
    let sig = Signature {
        method: "forward".to_string(),
        inputs: vec![spec(INPUT_NAME, PIXELS)],
        outputs: vec![spec(OUTPUT_NAME, NUM_CLASSES)],
    };
    SignatureMap {
        signatures: BTreeMap::from([(SIGNATURE_NAME.to_string(), sig)]),
    }
}

/// A split as tensors: images `[n, 784]` float and labels `[n]` int64.
pub fn to_tensors(split: &Split) -> (Tensor, Tensor) {
    let n = split.len() as i64;
    let images = Tensor::from_slice(&split.images).view([n, PIXELS as i64]);
    let labels: Vec<i64> = split.labels.iter().map(|&l| i64::from(l)).collect();
    (images, Tensor::from_slice(&labels))
}

/// Fraction of rows where the argmax of `scores` (`[n, 10]`) equals `labels` (`[n]`).
pub fn accuracy(scores: &Tensor, labels: &Tensor) -> f64 {
    scores
        .argmax(-1, false)
        .eq_tensor(labels)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
}

/// Trains on the training split, traces the model (softmax scores, shape `[-1, 10]`) and
/// writes version `opts.model_version` under `opts.export_dir`. Refuses, before training,
/// to overwrite an existing version folder. Sets LibTorch's (process-wide) thread count to
/// `opts.threads` unless that is 0.
pub fn train_and_export(opts: &ExportOptions) -> Result<ExportReport> {
    opts.validate()?;
    if opts.threads > 0 {
        tch::set_num_threads(i32::try_from(opts.threads).unwrap_or(i32::MAX));
    }
    let version_dir = opts.version_dir();
    refuse_existing(&version_dir)?;
    let data = data::load(&opts.data)?;

    tch::manual_seed(opts.seed);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root());
    let (train_x, train_y) = to_tensors(&data.train);
    let started = Instant::now();
    let final_loss = train(&vs, &net, &train_x, &train_y, opts)?;
    let training_time = started.elapsed();

    // Frozen variables become constants of the trace; with `requires_grad` still set,
    // tracing fails ("Cannot insert a Tensor that requires grad as a constant").
    vs.freeze();
    let module = tch::no_grad(|| {
        CModule::create_by_tracing(
            "MnistClassifier",
            "forward",
            &[Tensor::zeros(
                [1, PIXELS as i64],
                (Kind::Float, Device::Cpu),
            )],
            &mut |inputs| vec![net.forward(&inputs[0]).softmax(-1, Kind::Float)],
        )
    })?;
    // Measured on the traced module, which is what will be served.
    let (test_x, test_y) = to_tensors(&data.test);
    let scores = tch::no_grad(|| module.forward_ts(&[test_x]))?;
    let test_accuracy = accuracy(&scores, &test_y);

    write_version(&module, &opts.export_dir, &version_dir, opts.model_version)?;
    Ok(ExportReport {
        version_dir,
        training_iterations: opts.training_iterations,
        train_images: data.train.len(),
        final_loss,
        test_accuracy,
        training_time,
    })
}

/// 784 → 128 (ReLU) → 10 logits. Only `Linear` layers, so the trace keeps the batch
/// dimension free (no shape arithmetic gets baked in).
fn mlp(p: &nn::Path) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(
            p / "hidden",
            PIXELS as i64,
            HIDDEN_UNITS,
            Default::default(),
        ))
        .add_fn(|x| x.relu())
        .add(nn::linear(
            p / "logits",
            HIDDEN_UNITS,
            NUM_CLASSES as i64,
            Default::default(),
        ))
}

/// Runs `opts.training_iterations` Adam steps on minibatches drawn without replacement
/// from a fresh permutation each epoch; returns the mean loss of the last steps.
fn train(
    vs: &nn::VarStore,
    net: &impl Module,
    xs: &Tensor,
    ys: &Tensor,
    opts: &ExportOptions,
) -> Result<f64> {
    let mut opt = nn::Adam::default().build(vs, opts.learning_rate)?;
    let n = xs.size()[0];
    let batch = (opts.batch_size as i64).min(n);
    let mut perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
    let mut start = 0;
    let mut recent = std::collections::VecDeque::with_capacity(50);
    for _ in 0..opts.training_iterations {
        if start + batch > n {
            perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
            start = 0;
        }
        let idx = perm.narrow(0, start, batch);
        start += batch;
        let loss = net
            .forward(&xs.index_select(0, &idx))
            .cross_entropy_for_logits(&ys.index_select(0, &idx));
        opt.backward_step(&loss);
        if recent.len() == 50 {
            recent.pop_front();
        }
        recent.push_back(loss.double_value(&[]));
    }
    Ok(if recent.is_empty() {
        f64::NAN
    } else {
        recent.iter().sum::<f64>() / recent.len() as f64
    })
}

fn refuse_existing(version_dir: &Path) -> Result<()> {
    if version_dir.exists() {
        return Err(Error::VersionExists {
            path: version_dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Writes into a hidden folder beside the target and renames it into place, so a storage
/// watcher sees either no version or a complete one. The temporary name is not a number,
/// so version scanners skip it.
fn write_version(
    module: &CModule,
    export_dir: &Path,
    version_dir: &Path,
    version: Version,
) -> Result<()> {
    fs::create_dir_all(export_dir).map_err(|e| Error::io("cannot create", export_dir, e))?;
    let tmp = export_dir.join(format!(".tmp-{version}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io("cannot remove stale", &tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
    let result = (|| {
        module.save(tmp.join("model.pt"))?;
        let json = serde_json::to_string_pretty(&signature_map())
            .expect("a SignatureMap always serializes");
        let sig_path = tmp.join("signature.json");
        fs::write(&sig_path, json + "\n").map_err(|e| Error::io("cannot write", &sig_path, e))?;
        // Checked again: another exporter may have taken the version while this one trained,
        // and rename(2) would silently replace an empty folder.
        refuse_existing(version_dir)?;
        fs::rename(&tmp, version_dir).map_err(|e| Error::io("cannot rename into", version_dir, e))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_round_trips_through_aspire_core() {
        let json = serde_json::to_vec(&signature_map()).unwrap();
        let parsed = SignatureMap::from_json(&json).unwrap();
        let (name, sig) = parsed.resolve("").unwrap();
        assert_eq!(name, SIGNATURE_NAME);
        assert_eq!(sig.input(INPUT_NAME).unwrap().shape, Some(vec![-1, 784]));
        assert_eq!(sig.output(OUTPUT_NAME).unwrap().shape, Some(vec![-1, 10]));
        let text = String::from_utf8(json).unwrap();
        assert!(text.contains(r#""dtype":"float32""#), "{text}");
    }

    #[test]
    fn rejects_bad_options() {
        let mut opts = ExportOptions::new("/nonexistent", Version::new(1).unwrap());
        opts.batch_size = 0;
        assert!(
            opts.validate()
                .unwrap_err()
                .to_string()
                .contains("--batch-size")
        );
        opts.batch_size = 50;
        opts.learning_rate = -1.0;
        assert!(
            opts.validate()
                .unwrap_err()
                .to_string()
                .contains("--learning-rate")
        );
    }
}
