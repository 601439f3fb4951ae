//! `mnist-client`: the equivalent of TensorFlow Serving's `mnist_client.py`. Sends each
//! test image as its own `PredictRequest`, a fixed number in flight at once, and reports
//! the inference error rate the way the tutorial does (failed RPCs count as errors).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aspire_core::Version;
use aspire_proto::serving::model_spec::VersionChoice;
use aspire_proto::serving::prediction_service_client::PredictionServiceClient;
use aspire_proto::serving::{ModelSpec, PredictRequest, PredictResponse};
use aspire_proto::tensorflow::tensor_shape_proto::Dim;
use aspire_proto::{DataType, TensorProto, TensorShapeProto};
use futures::StreamExt;
use tonic::transport::{Channel, Endpoint};

use crate::data::{self, DATA_ENV, DEFAULT_DATA_PATH, NUM_CLASSES};
use crate::error::{Error, Result};
use crate::export::{INPUT_NAME, OUTPUT_NAME, SIGNATURE_NAME};

/// How the request's image tensor is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Encoding {
    /// `float_val`, as the tutorial's Python client sends it.
    Typed,
    /// `tensor_content`: raw little-endian bytes.
    Content,
}

/// Options of `mnist-client` (TensorFlow's snake_case spellings are accepted too).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "mnist-client",
    about = "Send MNIST test images to a TensorFlow Serving-compatible server and report the inference error rate"
)]
pub struct ClientOptions {
    /// Number of requests; test images are reused in order past the 1,000 there are.
    #[arg(
        long = "num-tests",
        visible_alias = "num_tests",
        env = "ASPIRE_MNIST_CLIENT_NUM_TESTS",
        default_value_t = 100
    )]
    pub num_tests: usize,
    /// The server's gRPC address, `host:port` or a `http://` URI.
    #[arg(
        long,
        env = "ASPIRE_MNIST_CLIENT_SERVER",
        default_value = "localhost:8500"
    )]
    pub server: String,
    /// Requests in flight at once.
    #[arg(long, env = "ASPIRE_MNIST_CLIENT_CONCURRENCY", default_value_t = 1)]
    pub concurrency: usize,
    /// `ModelSpec.name`.
    #[arg(
        long = "model-name",
        visible_alias = "model_name",
        env = "ASPIRE_MNIST_CLIENT_MODEL_NAME",
        default_value = "mnist"
    )]
    pub model_name: String,
    /// `ModelSpec.signature_name`.
    #[arg(
        long = "signature-name",
        visible_alias = "signature_name",
        env = "ASPIRE_MNIST_CLIENT_SIGNATURE_NAME",
        default_value = SIGNATURE_NAME
    )]
    pub signature_name: String,
    /// `ModelSpec.version`; without it the server picks (normally the latest).
    #[arg(
        long = "model-version",
        visible_alias = "model_version",
        env = "ASPIRE_MNIST_CLIENT_MODEL_VERSION"
    )]
    pub model_version: Option<Version>,
    /// How to encode the image tensor.
    #[arg(long, value_enum, env = "ASPIRE_MNIST_CLIENT_ENCODING", default_value_t = Encoding::Typed)]
    pub encoding: Encoding,
    /// Deadline of each RPC (and of connecting), in milliseconds.
    #[arg(
        long = "timeout-ms",
        visible_alias = "timeout_ms",
        env = "ASPIRE_MNIST_CLIENT_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub timeout_ms: u64,
    /// The gzip'd MNIST CSV; its test split is what gets sent.
    #[arg(long, env = DATA_ENV, default_value = DEFAULT_DATA_PATH)]
    pub data: PathBuf,
}

impl ClientOptions {
    fn validate(&self) -> Result<()> {
        if self.concurrency == 0 {
            return Err(Error::InvalidOption(
                "--concurrency is 0; it must be at least 1".into(),
            ));
        }
        if self.timeout_ms == 0 {
            return Err(Error::InvalidOption(
                "--timeout-ms is 0; it must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// What a client run saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientReport {
    /// Requests sent.
    pub requests: usize,
    /// Answers whose argmax differs from the label.
    pub wrong_predictions: usize,
    /// Failed RPCs by gRPC code name (e.g. `Unavailable`).
    pub rpc_failures: BTreeMap<String, usize>,
    /// Answers without a usable `scores` output.
    pub bad_responses: usize,
    /// The first failure's message, to show what went wrong.
    pub first_failure: Option<String>,
    /// Answers by `PredictResponse.model_spec.version`.
    pub versions: BTreeMap<i64, usize>,
    /// Answers that named no version.
    pub unversioned: usize,
    /// Wall time from the first request to the last answer.
    pub elapsed: Duration,
}

impl ClientReport {
    /// Failed RPCs, all codes together.
    pub fn failed_rpcs(&self) -> usize {
        self.rpc_failures.values().sum()
    }

    /// Requests counted as errors: wrong answers, failed RPCs and unusable answers, as the
    /// tutorial's client counts them.
    pub fn errors(&self) -> usize {
        self.wrong_predictions + self.failed_rpcs() + self.bad_responses
    }

    /// Fraction of requests counted as errors.
    pub fn error_rate(&self) -> f64 {
        error_rate(self.errors(), self.requests)
    }

    /// Whether every RPC succeeded with a usable answer.
    pub fn all_answered(&self) -> bool {
        self.failed_rpcs() == 0 && self.bad_responses == 0
    }

    /// The counts line printed after the error rate, e.g.
    /// `1000 requests in 1.20 s; wrong: 92; RPC failures: 0; answered by version 1: 1000`.
    pub fn counts_line(&self) -> String {
        let mut line = format!(
            "{} requests in {:.2} s; wrong: {}; RPC failures: {}",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.wrong_predictions,
            self.failed_rpcs()
        );
        if !self.rpc_failures.is_empty() {
            let codes: Vec<String> = self
                .rpc_failures
                .iter()
                .map(|(code, n)| format!("{code}: {n}"))
                .collect();
            let _ = write!(line, " ({})", codes.join(", "));
        }
        if self.bad_responses > 0 {
            let _ = write!(line, "; unusable answers: {}", self.bad_responses);
        }
        let mut answered: Vec<String> = self
            .versions
            .iter()
            .map(|(v, n)| format!("version {v}: {n}"))
            .collect();
        if self.unversioned > 0 {
            answered.push(format!("no version: {}", self.unversioned));
        }
        if !answered.is_empty() {
            let _ = write!(line, "; answered by {}", answered.join(", "));
        }
        line
    }
}

/// `errors / num_tests`, 0 when nothing was sent.
pub fn error_rate(errors: usize, num_tests: usize) -> f64 {
    if num_tests == 0 {
        0.0
    } else {
        errors as f64 / num_tests as f64
    }
}

/// The tutorial's result line for a fraction, e.g. `Inference error rate: 13.1%`.
pub fn format_error_rate(rate: f64) -> String {
    format!("Inference error rate: {:.1}%", rate * 100.0)
}

/// Index of the largest score (the first on ties); `None` for an empty slice.
pub fn argmax(scores: &[f32]) -> Option<usize> {
    scores
        .iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f32)>, (i, &s)| match best {
            Some((_, b)) if b >= s => best,
            _ => Some((i, s)),
        })
        .map(|(i, _)| i)
}

/// `host:port` becomes `http://host:port`; URIs with a scheme are kept.
pub fn endpoint_uri(server: &str) -> String {
    if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    }
}

/// One image as the tutorial's request: input `images`, DT_FLOAT, shape `[1, 784]`.
pub fn build_request(opts: &ClientOptions, image: &[f32]) -> PredictRequest {
    let shape = TensorShapeProto {
        dim: [1, image.len() as i64]
            .into_iter()
            .map(|size| Dim {
                size,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    };
    let mut tensor = TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: Some(shape),
        ..Default::default()
    };
    match opts.encoding {
        Encoding::Typed => tensor.float_val = image.to_vec(),
        Encoding::Content => {
            let bytes: Vec<u8> = image.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensor.tensor_content = bytes.into();
        }
    }
    PredictRequest {
        model_spec: Some(ModelSpec {
            name: opts.model_name.clone(),
            signature_name: opts.signature_name.clone(),
            version_choice: opts
                .model_version
                .map(|v| VersionChoice::Version(v.as_i64())),
        }),
        inputs: [(INPUT_NAME.to_string(), tensor)].into(),
        output_filter: Vec::new(),
    }
}

/// The `scores` output as floats, from `float_val` or, if that is empty, `tensor_content`;
/// an error sentence if it is missing, not DT_FLOAT or not 10 values.
pub fn scores_from_response(response: &PredictResponse) -> Result<Vec<f32>, String> {
    let tensor = response.outputs.get(OUTPUT_NAME).ok_or_else(|| {
        let names: Vec<&str> = response.outputs.keys().map(String::as_str).collect();
        format!(
            "answer has no output '{OUTPUT_NAME}' (it has: {})",
            names.join(", ")
        )
    })?;
    if tensor.dtype != DataType::DtFloat as i32 {
        return Err(format!(
            "output '{OUTPUT_NAME}' has dtype {}; expected DT_FLOAT",
            DataType::try_from(tensor.dtype).map_or("unknown", |d| d.as_str_name())
        ));
    }
    let scores: Vec<f32> = if !tensor.float_val.is_empty() {
        tensor.float_val.clone()
    } else {
        let bytes = &tensor.tensor_content[..];
        if bytes.len() % 4 != 0 {
            return Err(format!(
                "output '{OUTPUT_NAME}' has {} content bytes, not a multiple of 4",
                bytes.len()
            ));
        }
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    if scores.len() != NUM_CLASSES {
        return Err(format!(
            "output '{OUTPUT_NAME}' has {} values; expected {NUM_CLASSES}",
            scores.len()
        ));
    }
    Ok(scores)
}

/// What happened to one request.
enum Outcome {
    Answered { correct: bool, version: Option<i64> },
    Unusable(String),
    Failed(tonic::Status),
}

/// Loads the test split, connects, sends `num_tests` requests with `concurrency` in
/// flight and tallies the answers. Fails only if the data cannot be loaded or the server
/// cannot be reached; failed RPCs are counted in the report.
pub async fn run_client(opts: &ClientOptions) -> Result<ClientReport> {
    opts.validate()?;
    let test = data::load(&opts.data)?.test;
    let uri = endpoint_uri(&opts.server);
    let timeout = Duration::from_millis(opts.timeout_ms);
    let connect_error = |message: String| Error::Connect {
        endpoint: uri.clone(),
        message,
    };
    let channel = Endpoint::from_shared(uri.clone())
        .map_err(|e| connect_error(e.to_string()))?
        .connect_timeout(timeout)
        .connect()
        .await
        .map_err(|e| connect_error(error_chain(&e)))?;

    let started = Instant::now();
    let outcomes: Vec<Outcome> = futures::stream::iter(0..opts.num_tests)
        .map(|i| {
            let row = i % test.len();
            let request = build_request(opts, test.image(row));
            predict(channel.clone(), request, timeout, test.labels[row])
        })
        .buffer_unordered(opts.concurrency)
        .collect()
        .await;

    let mut report = ClientReport {
        requests: opts.num_tests,
        elapsed: started.elapsed(),
        ..Default::default()
    };
    for outcome in outcomes {
        match outcome {
            Outcome::Answered { correct, version } => {
                if !correct {
                    report.wrong_predictions += 1;
                }
                match version {
                    Some(v) => *report.versions.entry(v).or_default() += 1,
                    None => report.unversioned += 1,
                }
            }
            Outcome::Unusable(message) => {
                report.bad_responses += 1;
                report.first_failure.get_or_insert(message);
            }
            Outcome::Failed(status) => {
                *report
                    .rpc_failures
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1;
                report
                    .first_failure
                    .get_or_insert_with(|| format!("{:?}: {}", status.code(), status.message()));
            }
        }
    }
    Ok(report)
}

async fn predict(
    channel: Channel,
    request: PredictRequest,
    timeout: Duration,
    label: u8,
) -> Outcome {
    let mut client = PredictionServiceClient::new(channel).max_decoding_message_size(usize::MAX);
    let mut request = tonic::Request::new(request);
    request.set_timeout(timeout);
    let response = match client.predict(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Outcome::Failed(status),
    };
    match scores_from_response(&response) {
        Ok(scores) => Outcome::Answered {
            correct: argmax(&scores) == Some(usize::from(label)),
            version: response.model_spec.and_then(|s| match s.version_choice {
                Some(VersionChoice::Version(v)) => Some(v),
                _ => None,
            }),
        },
        Err(message) => Outcome::Unusable(message),
    }
}

/// Transport errors hide the useful part ("connection refused") in their sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let message = s.to_string();
        // hyper-util repeats its own message one level down ("tcp connect error").
        if !text.ends_with(&message) {
            let _ = write!(text, ": {message}");
        }
        source = s.source();
    }
    text
}
