//! The worker's `/metrics`, scraped over HTTP: a whole worker ([`run_worker_with_metrics`])
//! over an in-memory registry, serving a real TorchScript model in LibTorch, after good
//! requests, a bad one, one for an unknown model, and a version that cannot load.
//!
//! `ASPIRE_TEST_PYTHON` picks a Python with torch 2.11.0 other than the workspace's `.venv`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aspire_core::{
    AspiredVersions, AvailableVersion, AvailableVersions, ModelName, SignatureMap, Version,
};
use aspire_proto::serving::model_service_client::ModelServiceClient;
use aspire_proto::serving::prediction_service_client::PredictionServiceClient;
use aspire_proto::serving::{GetModelStatusRequest, ModelSpec, PredictRequest};
use aspire_proto::tensorflow::tensor_shape_proto::Dim;
use aspire_proto::{DataType, TensorProto, TensorShapeProto};
use aspire_registry::{MemoryRegistry, Registry};
use aspire_telemetry::metrics::{MetricsPort, sample, scrape};
use aspire_worker::app::{WorkerCli, run_worker, run_worker_with_metrics};
use clap::Parser;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;

const LIMIT: Duration = Duration::from_secs(60);

/// `x * 2`, scripted to TorchScript.
const MODULE_PY: &str = r#"
import sys, torch

class Double(torch.nn.Module):
    def forward(self, x):
        return x * 2.0

torch.jit.script(Double()).save(sys.argv[1])
"#;

const SIG: &str = r#"{"signatures": {"predict": {
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}]}}}"#;

/// Writes `model.pt` (from the venv's torch) and `signature.json` into `dir`.
fn script_model(dir: &Path) {
    let python = std::env::var_os("ASPIRE_TEST_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"),
        PathBuf::from,
    );
    assert!(
        python.exists(),
        "{} is missing: run `make setup` to make the venv",
        python.display()
    );
    std::fs::create_dir_all(dir).unwrap();
    let script = dir.join("module.py");
    std::fs::write(&script, MODULE_PY).unwrap();
    let out = Command::new(&python)
        .arg(&script)
        .arg(dir.join("model.pt"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripting failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.join("signature.json"), SIG).unwrap();
}

/// Publishes version 1 of `model`, stored in `dir`, as available and aspired.
async fn publish(registry: &MemoryRegistry, model: &str, dir: &Path) {
    let name = ModelName::new(model).unwrap();
    let version = Version::new(1).unwrap();
    let available = AvailableVersions {
        versions: vec![AvailableVersion {
            version,
            path: format!("file://{}", dir.display()),
            signatures: SignatureMap::from_json(SIG.as_bytes()).unwrap(),
        }],
    };
    registry.put_available(&name, &available).await.unwrap();
    let aspired = AspiredVersions {
        versions: vec![version],
    };
    registry.put_aspired(&name, &aspired).await.unwrap();
}

fn settings(args: &[&str], local: std::net::SocketAddr) -> aspire_worker::app::WorkerSettings {
    let cli =
        WorkerCli::try_parse_from(std::iter::once("aspire-worker").chain(args.iter().copied()))
            .unwrap();
    cli.settings(local).unwrap()
}

fn request(model: &str, shape: &[i64]) -> PredictRequest {
    let n: i64 = shape.iter().product();
    let x = TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: Some(TensorShapeProto {
            dim: shape
                .iter()
                .map(|&size| Dim {
                    size,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        }),
        float_val: (0..n).map(|i| i as f32).collect(),
        ..Default::default()
    };
    PredictRequest {
        model_spec: Some(ModelSpec {
            name: model.into(),
            ..Default::default()
        }),
        inputs: [("x".to_string(), x)].into(),
        output_filter: Vec::new(),
    }
}

/// Polls `probe` until it returns `Some`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(started.elapsed() < LIMIT, "{what}: not within {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_batches_and_loads() {
    let storage = TempDir::new().unwrap();
    let good = storage.path().join("m/1");
    script_model(&good);
    // A version directory without `model.pt`: every load of it fails.
    let broken = storage.path().join("broken/1");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("signature.json"), SIG).unwrap();
    let registry = Arc::new(MemoryRegistry::default());
    publish(&registry, "m", &good).await;
    publish(&registry, "broken", &broken).await;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = metrics_listener.local_addr().unwrap();
    let cache = storage.path().join("cache");
    let settings = settings(
        &[
            "--worker-id=metrics-test",
            "--device=cpu",
            "--enable_batching",
            // One-row requests are padded to 2.
            "--allowed-batch-sizes=2,4",
            "--num-batch-threads=1",
            "--tensorflow_intra_op_parallelism=1",
            "--tensorflow_inter_op_parallelism=1",
            &format!("--cache-dir={}", cache.display()),
            &format!("--storage-root={}", storage.path().display()),
        ],
        addr,
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(run_worker_with_metrics(
        settings,
        registry.clone() as Arc<dyn Registry>,
        listener,
        Some(metrics_listener),
        async {
            let _ = stopped.await;
        },
    ));

    let channel: Channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let status = ModelServiceClient::new(channel.clone());
    eventually("m version 1 AVAILABLE", || {
        let mut status = status.clone();
        async move {
            let request = GetModelStatusRequest {
                model_spec: Some(ModelSpec {
                    name: "m".into(),
                    ..Default::default()
                }),
            };
            let answer = status.get_model_status(request).await.ok()?.into_inner();
            // 30: AVAILABLE.
            answer
                .model_version_status
                .iter()
                .any(|s| s.version == 1 && s.state == 30)
                .then_some(())
        }
    })
    .await;

    let mut client = PredictionServiceClient::new(channel);
    for _ in 0..3 {
        let answer = client.predict(request("m", &[1, 3])).await.unwrap();
        assert_eq!(
            answer.into_inner().outputs["y"].float_val,
            vec![0.0, 2.0, 4.0]
        );
    }
    let bad = client.predict(request("m", &[1, 2])).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let unknown = client.predict(request("nope", &[1, 3])).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // The broken version's first load fails soon after start; wait for its count.
    let text = eventually("a failed load of 'broken' counted", || async move {
        let text = scrape(metrics).await.unwrap();
        let labels = [("model", "broken")];
        sample(&text, "aspire_worker_version_load_failures_total", &labels)
            .filter(|n| *n >= 1.0)
            .map(|_| text)
    })
    .await;
    let get = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);
    let m1 = [("model", "m"), ("version", "1")];
    let requests = |model, version, code| [("model", model), ("version", version), ("code", code)];
    assert_eq!(
        get("aspire_worker_requests_total", &requests("m", "1", "OK")),
        Some(3.0)
    );
    assert_eq!(
        get(
            "aspire_worker_requests_total",
            &requests("m", "1", "InvalidArgument")
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            "aspire_worker_requests_total",
            &requests("", "", "NotFound")
        ),
        Some(1.0)
    );
    assert_eq!(
        get("aspire_worker_request_duration_seconds_count", &m1),
        Some(4.0)
    );
    // The bad request never reached the batcher: three batches of one row each.
    assert_eq!(get("aspire_worker_batch_rows_count", &m1), Some(3.0));
    assert_eq!(get("aspire_worker_batch_rows_sum", &m1), Some(3.0));
    assert_eq!(
        get("aspire_worker_batch_padding_rows_total", &m1),
        Some(3.0)
    );
    assert_eq!(
        get("aspire_worker_queue_wait_seconds_count", &m1),
        Some(3.0)
    );
    assert_eq!(
        get("aspire_worker_forward_pass_seconds_count", &m1),
        Some(3.0)
    );
    assert_eq!(get("aspire_worker_queue_rows", &m1), Some(0.0));
    assert_eq!(
        get(
            "aspire_worker_version_load_duration_seconds_count",
            &[("model", "m")]
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            "aspire_worker_version_load_failures_total",
            &[("model", "m")]
        ),
        None
    );
    assert_eq!(
        get("aspire_worker_versions_available", &[("model", "m")]),
        Some(1.0)
    );
    assert_eq!(
        get("aspire_worker_versions_available", &[("model", "broken")]),
        Some(0.0)
    );

    let _ = stop.send(());
    tokio::time::timeout(LIMIT, worker)
        .await
        .expect("the worker did not stop")
        .unwrap()
        .unwrap();
    // The endpoint goes with the worker.
    eventually("the metrics endpoint closed", || async move {
        scrape(metrics).await.is_err().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_metrics_port_given_must_be_free() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = taken.local_addr().unwrap().port();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let flag = format!("--metrics-port={port}");
    let settings = settings(
        &[
            "--worker-id=w",
            "--device=cpu",
            "--storage-root=/models",
            &flag,
        ],
        addr,
    );
    assert_eq!(settings.metrics, MetricsPort::Required(port));
    let registry = Arc::new(MemoryRegistry::default()) as Arc<dyn Registry>;
    let err = run_worker(settings, registry, listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--metrics-port"), "{err}");

    let default = WorkerCli::try_parse_from(["aspire-worker", "--storage-root=/models"]).unwrap();
    assert_eq!(
        default.settings(addr).unwrap().metrics,
        MetricsPort::Default(aspire_worker::app::DEFAULT_METRICS_PORT)
    );
}
