//! Storage roots end to end: two real workers (in-process, built from their real flags)
//! on a real etcd, loading real TorchScript. One may load only from `models/`, the other
//! from `models/` and `outside/`. The registry names versions of one model outside
//! `models/` (directly, through `..`, through a symlinked version directory and through a
//! symlinked file): the first worker refuses each before fetching it, says why in its
//! etcd record, in GetModelStatus and in `aspirectl status`, does not retry, and keeps
//! serving the version inside its root; the second loads the same locations (so the files
//! are good models and only the check stopped the first), except the one with `..`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use aspire_core::{
    AspiredVersions, AvailableVersion, AvailableVersions, ModelName, SignatureMap, Version,
    WorkerRecord,
};
use aspire_proto::serving::model_service_client::ModelServiceClient;
use aspire_proto::serving::prediction_service_client::PredictionServiceClient;
use aspire_proto::serving::{GetModelStatusRequest, PredictRequest};
use aspire_proto::{TensorProto, TensorShapeProto, tensorflow::tensor_shape_proto::Dim};
use aspire_registry::etcd_server::EtcdServer;
use aspire_registry::{EtcdOptions, EtcdRegistry, Registry};
use aspire_telemetry::metrics::{sample, scrape};
use aspire_tests::{channel, eventually, spec, workspace_root};
use aspire_worker::app::{WorkerCli, run_worker_with_metrics};
use clap::{CommandFactory, FromArgMatches, Parser};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const LIMIT: Duration = Duration::from_secs(90);
const PREFIX: &str = "/roots-test";

/// `Scale(k)` answers `x * k`, so an answer tells which version ran.
const MODULES_PY: &str = r#"
import os, sys, torch

class Scale(torch.nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k

for k in (1, 2):
    torch.jit.script(Scale(float(k))).save(os.path.join(sys.argv[1], f"scale{k}.pt"))
"#;

const SIG: &str = r#"{"signatures": {"predict": {
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}]}}}"#;

/// Scripts `scale1.pt` and `scale2.pt` into `dir` with the workspace's torch.
fn script_modules(dir: &Path) {
    let script = dir.join("modules.py");
    std::fs::write(&script, MODULES_PY).unwrap();
    let out = Command::new(workspace_root().join(".venv/bin/python"))
        .arg(&script)
        .arg(dir)
        .output()
        .expect("run the venv's python (make setup makes it)");
    assert!(
        out.status.success(),
        "scripting failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes a version directory: `module` as `model.pt`, and the signature.
fn store(modules: &Path, dir: &Path, module: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(modules.join(format!("{module}.pt")), dir.join("model.pt")).unwrap();
    std::fs::write(dir.join("signature.json"), SIG).unwrap();
}

fn v(n: u64) -> Version {
    Version::new(n).unwrap()
}

fn entry(version: u64, path: String) -> AvailableVersion {
    AvailableVersion {
        version: v(version),
        path,
        signatures: SignatureMap::from_json(SIG.as_bytes()).unwrap(),
    }
}

/// A worker running in this process, stopped when dropped.
struct Worker {
    addr: String,
    metrics: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Worker {
    /// Starts a worker from its command-line flags (besides the listen address).
    async fn start(flags: &[String]) -> Worker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = metrics_listener.local_addr().unwrap();
        let argv = std::iter::once("aspire-worker".to_string()).chain(flags.iter().cloned());
        let cli = WorkerCli::try_parse_from(argv).expect("worker flags");
        let settings = cli.settings(local).expect("worker settings");
        let registry = Arc::new(cli.etcd.connect().await.expect("etcd"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let result = run_worker_with_metrics(
                settings,
                registry.clone(),
                listener,
                Some(metrics_listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
            let _ = registry.close().await;
            result.expect("the worker ran");
        });
        Worker {
            addr: local.to_string(),
            metrics,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn load_failures(&self, model: &str) -> f64 {
        let text = scrape(self.metrics).await.expect("scrape");
        sample(
            &text,
            "aspire_worker_version_load_failures_total",
            &[("model", model)],
        )
        .unwrap_or(0.0)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("the worker task");
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// `worker`'s record once `ok` holds for it.
async fn record_when(
    registry: &EtcdRegistry,
    worker: &str,
    what: &str,
    ok: impl Fn(&WorkerRecord) -> bool,
) -> WorkerRecord {
    eventually(LIMIT, what, || async {
        let state = registry.state().await.ok()?;
        state.workers.get(worker).filter(|r| ok(r)).cloned()
    })
    .await
}

fn error_of(record: &WorkerRecord, version: u64) -> Option<&str> {
    record
        .models
        .get(&ModelName::new("m").unwrap())?
        .get(&v(version))?
        .error
        .as_deref()
}

async fn predict_scale(addr: &str, first: f32) -> Vec<f32> {
    let mut client = PredictionServiceClient::new(channel(addr).await);
    let x = TensorProto {
        dtype: 1,
        tensor_shape: Some(TensorShapeProto {
            dim: [1, 3]
                .iter()
                .map(|&size| Dim {
                    size,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        }),
        float_val: vec![first, 1.0, 2.0],
        ..Default::default()
    };
    let response = client
        .predict(PredictRequest {
            model_spec: Some(spec("m", None)),
            inputs: [("x".to_string(), x)].into(),
            output_filter: Vec::new(),
        })
        .await
        .expect("predict")
        .into_inner();
    response.outputs["y"].float_val.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locations_outside_the_storage_roots_are_refused_before_any_fetch() {
    let tmp = tempfile::tempdir().unwrap();
    let modules = tmp.path().join("modules");
    std::fs::create_dir_all(&modules).unwrap();
    script_modules(&modules);
    let models = tmp.path().join("models");
    let outside = tmp.path().join("outside");
    // Version 1: inside the root. Version 2: a good model outside it.
    store(&modules, &models.join("m/1"), "scale1");
    store(&modules, &outside.join("m/2"), "scale2");
    // Version 4: a symlink inside the root to version 2's directory.
    std::fs::create_dir_all(models.join("m")).unwrap();
    std::os::unix::fs::symlink(outside.join("m/2"), models.join("m/4")).unwrap();
    // Version 5: a real directory whose model.pt is a symlink to version 2's.
    std::fs::create_dir_all(models.join("m/5")).unwrap();
    std::fs::write(models.join("m/5/signature.json"), SIG).unwrap();
    std::os::unix::fs::symlink(outside.join("m/2/model.pt"), models.join("m/5/model.pt")).unwrap();
    // A control model whose only version inside the root holds no files: its load fails
    // and is retried, which shows when the refused versions had their chance to be.
    std::fs::create_dir_all(models.join("ctl/1")).unwrap();

    let url = |p: PathBuf| format!("file://{}", p.display());
    let locations = [
        (1, url(models.join("m/1"))),
        (2, url(outside.join("m/2"))),
        (3, format!("{}/m/../../outside/m/2", url(models.clone()))),
        (4, url(models.join("m/4"))),
        (5, url(models.join("m/5"))),
    ];
    // The `..` location names a real, good model: only the check can stop it.
    assert!(models.join("m/../../outside/m/2/model.pt").is_file());

    let etcd = EtcdServer::start().expect("etcd");
    let endpoint = etcd.endpoint();
    let registry = EtcdRegistry::connect(
        std::slice::from_ref(&endpoint),
        aspire_core::keys::KeySchema::new(PREFIX),
        EtcdOptions::default(),
    )
    .await
    .expect("connect to etcd");
    let m = ModelName::new("m").unwrap();
    let available = AvailableVersions {
        versions: locations
            .iter()
            .map(|(n, path)| entry(*n, path.clone()))
            .collect(),
    };
    registry.put_available(&m, &available).await.unwrap();
    let aspired = AspiredVersions {
        versions: (1..=5).map(v).collect(),
    };
    registry.put_aspired(&m, &aspired).await.unwrap();
    let ctl = ModelName::new("ctl").unwrap();
    let ctl_available = AvailableVersions {
        versions: vec![entry(1, url(models.join("ctl/1")))],
    };
    registry.put_available(&ctl, &ctl_available).await.unwrap();
    registry
        .put_aspired(
            &ctl,
            &AspiredVersions {
                versions: vec![v(1)],
            },
        )
        .await
        .unwrap();

    let flags = |id: &str, roots: String| -> Vec<String> {
        vec![
            format!("--etcd-endpoints={endpoint}"),
            format!("--prefix={PREFIX}"),
            format!("--worker-id={id}"),
            "--device=cpu".into(),
            "--num-batch-threads=1".into(),
            "--tensorflow_intra_op_parallelism=1".into(),
            "--tensorflow_inter_op_parallelism=1".into(),
            format!(
                "--cache-dir={}",
                tmp.path().join(format!("cache-{id}")).display()
            ),
            format!("--storage-root={roots}"),
        ]
    };
    let confined = Worker::start(&flags("confined", models.display().to_string())).await;
    // Both roots in one flag value, comma-separated as in ASPIRE_STORAGE_ROOTS.
    let both = format!("{},{}", models.display(), outside.display());
    let wider = Worker::start(&flags("wider", both)).await;

    // The confined worker: version 1 AVAILABLE, every other one refused, with why.
    let record = record_when(
        &registry,
        "confined",
        "the confined worker's refusals",
        |r| r.available_versions(&m) == vec![v(1)] && (2..=5).all(|n| error_of(r, n).is_some()),
    )
    .await;
    let root = url(models.clone());
    let v2_error = format!(
        "location {} of m version 2 is outside the storage roots (--storage-root {root}); not loaded",
        locations[1].1
    );
    assert_eq!(error_of(&record, 2), Some(v2_error.as_str()));
    let v3 = error_of(&record, 3).unwrap();
    assert!(
        v3.starts_with(&format!(
            "location {} of m version 3 has the dot segment \"..\"",
            locations[2].1
        )) && v3.ends_with("; not loaded"),
        "{v3}"
    );
    let real_outside = std::fs::canonicalize(&outside).unwrap();
    let v4 = error_of(&record, 4).unwrap();
    assert!(
        v4.contains(&format!(
            "of m version 4 resolves to {} (through a symlink), outside the storage roots (--storage-root {root})",
            real_outside.join("m/2").display()
        )),
        "{v4}"
    );
    let v5 = error_of(&record, 5).unwrap();
    assert!(
        v5.contains("of m version 5 holds a file out of the storage roots")
            && v5.contains(&format!(
                "resolves to {}",
                real_outside.join("m/2/model.pt").display()
            ))
            && v5.ends_with("; not loaded"),
        "{v5}"
    );

    // Never fetched: the cache holds version 1 only, and no staging directory.
    let cached: Vec<String> = std::fs::read_dir(tmp.path().join("cache-confined/m"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached, ["1"]);

    // The same refusal in GetModelStatus and in `aspirectl status`.
    let mut models_client = ModelServiceClient::new(channel(&confined.addr).await);
    let status = models_client
        .get_model_status(GetModelStatusRequest {
            model_spec: Some(spec("m", Some(2))),
        })
        .await
        .expect("GetModelStatus")
        .into_inner();
    let v2_status = &status.model_version_status[0];
    assert_eq!((v2_status.version, v2_status.state), (2, 50));
    assert_eq!(
        v2_status.status.as_ref().map(|s| s.error_message.as_str()),
        Some(v2_error.as_str())
    );
    let ctl_text = aspirectl::render_status(&registry.state().await.unwrap());
    assert!(
        ctl_text.contains(&format!("m v2: END  error: {v2_error}")),
        "{ctl_text}"
    );

    // Version 1 keeps serving.
    assert_eq!(predict_scale(&confined.addr, 3.0).await, [3.0, 1.0, 2.0]);

    // Not retried: the control model's failed load is retried (after 1 s, then 2 s more),
    // while the four refusals are still counted once each.
    eventually(LIMIT, "the control version's third failed load", || async {
        (confined.load_failures("ctl").await >= 3.0).then_some(())
    })
    .await;
    assert_eq!(confined.load_failures("m").await, 4.0);

    // The wider worker loads the very same locations, except the one with `..`.
    let record = record_when(&registry, "wider", "the wider worker's versions", |r| {
        r.available_versions(&m) == vec![v(1), v(2), v(4), v(5)] && error_of(r, 3).is_some()
    })
    .await;
    assert!(
        error_of(&record, 3).unwrap().contains("dot segment"),
        "{record:?}"
    );
    // Its default version is the highest AVAILABLE: 5, whose model.pt is version 2's.
    assert_eq!(predict_scale(&wider.addr, 3.0).await, [6.0, 2.0, 4.0]);

    confined.stop().await;
    wider.stop().await;
    drop(etcd);
}

/// `aspire-worker`'s flags as given on `argv` alone: this process's environment (an
/// `ASPIRE_STORAGE_ROOTS` of the developer's) must not supply a root.
fn worker_flags(argv: &[&str]) -> WorkerCli {
    let matches = WorkerCli::command()
        .mut_args(|a| a.env(None::<&'static str>))
        .try_get_matches_from(argv)
        .expect("flags parse");
    WorkerCli::from_arg_matches(&matches).expect("flags convert")
}

#[test]
fn a_worker_without_a_storage_root_does_not_start() {
    let addr = "127.0.0.1:8501".parse().unwrap();
    let err = worker_flags(&["aspire-worker", "--worker-id=w"])
        .settings(addr)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("no --storage-root given") && err.contains("ASPIRE_STORAGE_ROOTS"),
        "{err}"
    );
    let bad = worker_flags(&["aspire-worker", "--storage-root=ftp://host/models"])
        .settings(addr)
        .unwrap_err()
        .to_string();
    assert!(
        bad.contains("--storage-root \"ftp://host/models\": unsupported scheme 'ftp'"),
        "{bad}"
    );
    let roots = worker_flags(&[
        "aspire-worker",
        "--storage-root=/a,s3://b/p",
        "--storage-root=/c",
    ])
    .settings(addr)
    .unwrap()
    .storage_roots;
    assert_eq!(roots.describe(), "file:///a, s3://b/p, file:///c");
}
