//! End to end with the real `aspire-server` process, real TorchScript files in real
//! LibTorch, over real gRPC on loopback: TensorFlow Serving's MNIST tutorial with a version
//! swap under load, bad requests, a corrupt version, a model exported from Python, and a
//! TensorFlow Serving command line.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aspire_mnist::client::{ClientOptions, ClientReport, build_request, run_client};
use aspire_proto::serving::{GetModelMetadataRequest, GetModelStatusRequest, PredictRequest};
use aspire_proto::{TensorProto, TensorShapeProto, tensorflow::tensor_shape_proto::Dim};
use aspire_tests::{Server, copy_dir, eventually, export, mnist_data, spec, workspace_root};
use clap::Parser;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(90);

async fn client(server: &Server, num_tests: usize, concurrency: usize) -> ClientReport {
    let opts = ClientOptions::parse_from([
        "mnist-client".to_string(),
        format!("--num_tests={num_tests}"),
        format!("--server={}", server.addr),
        format!("--concurrency={concurrency}"),
        format!("--data={}", mnist_data()),
        "--timeout-ms=30000".to_string(),
    ]);
    run_client(&opts).await.expect("client ran")
}

fn f32_tensor(shape: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        dtype: 1,
        tensor_shape: Some(TensorShapeProto {
            dim: shape
                .iter()
                .map(|s| Dim {
                    size: *s,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        }),
        float_val: values.to_vec(),
        ..Default::default()
    }
}

fn mnist_request(version: Option<i64>, inputs: Vec<(&str, TensorProto)>) -> PredictRequest {
    let mut model_spec = spec("mnist", version);
    model_spec.signature_name = "predict_images".into();
    PredictRequest {
        model_spec: Some(model_spec),
        inputs: inputs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        output_filter: vec![],
    }
}

/// The tutorial: v1 serves, v2 is copied in and goes live with a client running
/// throughout: zero failed requests, and v2's error rate is below v1's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_version_swap_loses_no_request() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exported = tmp.path().join("mnist_model");
    export(&exported, 100, 1);
    export(&exported, 2000, 2);
    let monitored = tmp.path().join("monitored");
    copy_dir(&exported.join("1"), &monitored.join("1"));

    let server = Server::start(&[
        "--enable_batching",
        "--model_name=mnist",
        &format!("--model_base_path={}", monitored.display()),
    ]);
    server.wait_available("mnist", 1, LIMIT).await;
    assert!(
        server
            .log()
            .contains("aspiring version(s) [1] of model mnist")
            || server.log().contains("aspiring"),
        "the poll log line is missing:\n{}",
        server.log()
    );

    let v1 = client(&server, 1000, 10).await;
    assert_eq!(v1.failed_rpcs(), 0, "{}", v1.counts_line());
    assert_eq!(v1.versions.get(&1), Some(&1000), "{}", v1.counts_line());

    // A steady client through the swap.
    let stop = Arc::new(AtomicBool::new(false));
    // Answers so far, all clients together: the copy waits on them, not on a fixed sleep.
    let answered = Arc::new(AtomicUsize::new(0));
    let mut steady = Vec::new();
    for _ in 0..4 {
        let mut c = server.predict_client().await;
        let (stop, answered) = (stop.clone(), answered.clone());
        let data = aspire_mnist::data::load(Path::new(&mnist_data())).expect("data");
        steady.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut by_v2) = (0usize, Vec::new(), 0usize);
            let opts = ClientOptions::parse_from(["mnist-client"]);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let req = build_request(&opts, data.test.image(i % data.test.len()));
                match c.predict(req).await {
                    Ok(r) => {
                        ok += 1;
                        answered.fetch_add(1, Ordering::Relaxed);
                        if r.into_inner()
                            .model_spec
                            .and_then(|s| s.version_choice)
                            .is_some_and(|v| {
                                matches!(
                                    v,
                                    aspire_proto::serving::model_spec::VersionChoice::Version(2)
                                )
                            })
                        {
                            by_v2 += 1;
                        }
                    }
                    Err(e) => failed.push(format!("{:?}: {}", e.code(), e.message())),
                }
                i += 1;
            }
            (ok, failed, by_v2)
        }));
    }
    // The steady clients are answered by v1 before the swap starts.
    eventually(LIMIT, "the steady clients answered by v1", || {
        let n = answered.load(Ordering::Relaxed);
        async move { (n >= 40).then_some(()) }
    })
    .await;

    let copied_at = Instant::now();
    copy_dir(&exported.join("2"), &monitored.join("2"));
    let mut pc = server.predict_client().await;
    let swap_time = eventually(LIMIT, "default requests answered by v2", || {
        let mut pc = pc.clone();
        async move {
            let req = build_request(&ClientOptions::parse_from(["mnist-client"]), &[0.0; 784]);
            let resp = pc.predict(req).await.ok()?.into_inner();
            let v = resp.model_spec?.version_choice?;
            matches!(
                v,
                aspire_proto::serving::model_spec::VersionChoice::Version(2)
            )
            .then(|| copied_at.elapsed())
        }
    })
    .await;
    let _ = &mut pc;
    println!("v2 served {swap_time:?} after the copy");

    let v2 = client(&server, 1000, 10).await;
    stop.store(true, Ordering::Relaxed);
    let mut total_ok = 0;
    for t in steady {
        let (ok, failed, by_v2) = t.await.expect("steady client");
        assert!(failed.is_empty(), "steady client saw failures: {failed:?}");
        assert!(by_v2 > 0, "steady client never reached v2");
        total_ok += ok;
    }
    println!(
        "v1 error rate {:.1}%, v2 error rate {:.1}%, steady requests {total_ok}",
        100.0 * v1.error_rate(),
        100.0 * v2.error_rate()
    );
    assert_eq!(v2.failed_rpcs(), 0, "{}", v2.counts_line());
    assert_eq!(v2.versions.get(&2), Some(&1000), "{}", v2.counts_line());
    assert!(
        v2.error_rate() < v1.error_rate(),
        "v2 {} vs v1 {}",
        v2.error_rate(),
        v1.error_rate()
    );

    // v1 is unloaded once v2 serves (latest-1 policy).
    let mut mc = server.model_client().await;
    eventually(LIMIT, "v1 unloaded (END)", || {
        let mut mc = mc.clone();
        async move {
            let r = mc
                .get_model_status(GetModelStatusRequest {
                    model_spec: Some(spec("mnist", Some(1))),
                })
                .await
                .ok()?
                .into_inner();
            (r.model_version_status.first()?.state == 50).then_some(())
        }
    })
    .await;
    let _ = &mut mc;
    assert_eq!(server.terminate(), Some(0), "clean exit on SIGTERM");
}

/// Malformed requests get the right code and a sentence a person can act on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    export(&tmp.path().join("m"), 20, 1);
    let server = Server::start(&[
        "--model_name=mnist",
        &format!("--model_base_path={}", tmp.path().join("m").display()),
    ]);
    server.wait_available("mnist", 1, LIMIT).await;
    let mut c = server.predict_client().await;
    let image = vec![0.5f32; 784];

    let cases: Vec<(&str, PredictRequest, Code, Vec<&str>)> = vec![
        (
            "wrong input name",
            mnist_request(None, vec![("pixels", f32_tensor(&[1, 784], &image))]),
            Code::InvalidArgument,
            vec!["images", "missing"],
        ),
        (
            "extra input",
            mnist_request(
                None,
                vec![
                    ("images", f32_tensor(&[1, 784], &image)),
                    ("x", f32_tensor(&[1], &[1.0])),
                ],
            ),
            Code::InvalidArgument,
            vec!["'x'"],
        ),
        (
            "wrong shape",
            mnist_request(None, vec![("images", f32_tensor(&[1, 783], &image[..783]))]),
            Code::InvalidArgument,
            vec!["[1, 783]", "[-1, 784]"],
        ),
        (
            "wrong dtype",
            mnist_request(
                None,
                vec![(
                    "images",
                    TensorProto {
                        dtype: 2,
                        double_val: vec![0.0; 784],
                        ..f32_tensor(&[1, 784], &[])
                    },
                )],
            ),
            Code::InvalidArgument,
            vec!["DT_DOUBLE", "DT_FLOAT"],
        ),
        (
            "content length",
            mnist_request(
                None,
                vec![(
                    "images",
                    TensorProto {
                        tensor_content: vec![0u8; 3132].into(),
                        ..f32_tensor(&[1, 784], &[])
                    },
                )],
            ),
            Code::InvalidArgument,
            vec!["3132", "3136"],
        ),
        (
            "values count",
            mnist_request(None, vec![("images", f32_tensor(&[2, 784], &image))]),
            Code::InvalidArgument,
            vec!["images", "784"],
        ),
        (
            "unknown version",
            mnist_request(Some(7), vec![("images", f32_tensor(&[1, 784], &image))]),
            Code::NotFound,
            vec!["7", "available versions of model 'mnist': 1"],
        ),
        (
            "unknown signature",
            PredictRequest {
                model_spec: Some(aspire_proto::serving::ModelSpec {
                    signature_name: "classify".into(),
                    ..spec("mnist", None)
                }),
                ..mnist_request(None, vec![("images", f32_tensor(&[1, 784], &image))])
            },
            Code::InvalidArgument,
            vec!["classify", "predict_images"],
        ),
        (
            "unknown model",
            PredictRequest {
                model_spec: Some(spec("resnet", None)),
                ..mnist_request(None, vec![])
            },
            Code::NotFound,
            vec!["resnet", "mnist"],
        ),
        (
            "no model_spec",
            PredictRequest::default(),
            Code::InvalidArgument,
            vec!["model_spec"],
        ),
    ];
    for (what, req, code, needles) in cases {
        let err = c.predict(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        for n in needles {
            assert!(
                err.message().contains(n),
                "{what}: {:?} lacks {n:?}",
                err.message()
            );
        }
    }
    // And a good request still works, with both encodings.
    let ok = c
        .predict(mnist_request(
            None,
            vec![("images", f32_tensor(&[3, 784], &vec![0.1; 3 * 784]))],
        ))
        .await
        .expect("typed");
    let scores = &ok.get_ref().outputs["scores"];
    assert_eq!(scores.float_val.len(), 30);
    let bytes: Vec<u8> = vec![0.1f32; 784]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let ok2 = c
        .predict(mnist_request(
            None,
            vec![(
                "images",
                TensorProto {
                    tensor_content: bytes.into(),
                    ..f32_tensor(&[1, 784], &[])
                },
            )],
        ))
        .await
        .expect("tensor_content");
    // Row 0 of a batch of 3 equals the same image alone (up to float rounding: batch sizes
    // take different BLAS paths).
    let alone = &ok2.get_ref().outputs["scores"].float_val;
    assert_eq!(alone.len(), 10);
    for (a, b) in alone.iter().zip(&scores.float_val[..10]) {
        assert!(
            (a - b).abs() < 1e-5,
            "{alone:?} vs {:?}",
            &scores.float_val[..10]
        );
    }

    // The gRPC health protocol says SERVING once the model is loaded.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    for service in ["", "tensorflow.serving.PredictionService"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    // Metadata and the unimplemented methods.
    let md = c
        .get_model_metadata(GetModelMetadataRequest {
            model_spec: Some(spec("mnist", None)),
            metadata_field: vec!["signature_def".into()],
        })
        .await
        .expect("metadata")
        .into_inner();
    assert_eq!(
        md.metadata["signature_def"].type_url,
        "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    );
    let err = c
        .classify(aspire_proto::serving::ClassificationRequest::default())
        .await
        .expect_err("classify");
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(err.message().contains("Predict"), "{}", err.message());
}

/// A corrupt new version reports its error while the old one keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_version_keeps_the_old_one_serving() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = tmp.path().join("m");
    export(&base, 20, 1);
    let server = Server::start(&[
        "--model_name=mnist",
        &format!("--model_base_path={}", base.display()),
        "--log-format=json",
    ]);
    server.wait_available("mnist", 1, LIMIT).await;

    std::fs::create_dir_all(tmp.path().join("staging/2")).expect("mkdir");
    std::fs::copy(
        base.join("1/signature.json"),
        tmp.path().join("staging/2/signature.json"),
    )
    .expect("cp");
    std::fs::write(
        tmp.path().join("staging/2/model.pt"),
        b"this is not a TorchScript archive",
    )
    .expect("write");
    std::fs::rename(tmp.path().join("staging/2"), base.join("2")).expect("mv");

    let mut mc = server.model_client().await;
    let error = eventually(LIMIT, "v2's load error in its status", || {
        let mut mc = mc.clone();
        async move {
            let r = mc
                .get_model_status(GetModelStatusRequest {
                    model_spec: Some(spec("mnist", Some(2))),
                })
                .await
                .ok()?
                .into_inner();
            let s = r.model_version_status.first()?;
            let msg = s.status.as_ref()?.error_message.clone();
            (s.state == 50 && !msg.is_empty()).then_some(msg)
        }
    })
    .await;
    let _ = &mut mc;
    assert!(error.contains("model.pt"), "{error}");
    // With --log-format=json every line is one JSON object with level, target and
    // message, and the load failure carries the model and version as fields.
    let log = server.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["target"].is_string() && l["message"].is_string()),
        "{log}"
    );
    assert!(
        lines.iter().any(|l| l["level"] == "ERROR"
            && l["model"] == "mnist"
            && l["version"] == "2"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("load failed"))),
        "no JSON line for v2's load failure with its model and version:\n{log}"
    );
    let report = client(&server, 50, 4).await;
    assert_eq!(report.failed_rpcs(), 0, "{}", report.counts_line());
    assert_eq!(
        report.versions.get(&1),
        Some(&50),
        "{}",
        report.counts_line()
    );
}

/// A model exported from Python with torch.jit.script, served next to mnist through
/// TensorFlow Serving's model config file; a TF Serving command line with a batching
/// parameters file and an unimplemented flag starts the server; a request whose deadline
/// passes while queued is not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_model_config_file_and_tf_flags() {
    let tmp = tempfile::tempdir().expect("tmp");
    let py = workspace_root().join(".venv/bin/python");
    let status = Command::new(&py)
        .arg(workspace_root().join("scripts/make_python_model.py"))
        .arg(tmp.path().join("py"))
        .status()
        .expect("run python");
    assert!(status.success(), "make_python_model.py failed");
    export(&tmp.path().join("mnist"), 20, 1);
    let config = tmp.path().join("models.config");
    std::fs::write(
        &config,
        format!(
            "model_config_list {{\n  config {{ name: 'mnist' base_path: '{}' model_platform: 'pytorch' }}\n  config {{ name: 'py' base_path: '{}' model_version_policy {{ all {{}} }} }}\n}}\n",
            tmp.path().join("mnist").display(),
            tmp.path().join("py").display()
        ),
    )
    .expect("config");
    let batching = tmp.path().join("batching.config");
    std::fs::write(&batching, "max_batch_size { value: 8 }\nbatch_timeout_micros { value: 1000 }\nnum_batch_threads { value: 1 }\n").expect("batching");
    let server = Server::start(&[
        "--enable_batching=true",
        &format!("--batching_parameters_file={}", batching.display()),
        &format!("--model_config_file={}", config.display()),
        "--model_config_file_poll_wait_seconds=1",
        "--rest_api_port=8501",
        "--enable_model_warmup",
    ]);
    server.wait_available("py", 1, LIMIT).await;
    server.wait_available("mnist", 1, LIMIT).await;
    assert!(
        server.log().contains("rest_api_port"),
        "no warning for --rest_api_port:\n{}",
        server.log()
    );

    let mut c = server.predict_client().await;
    let x = [1.0f32, 2.0, 3.0, 4.0, -1.0, 0.0, 0.5, 10.0];
    let req = PredictRequest {
        model_spec: Some(spec("py", None)),
        inputs: [("x".to_string(), f32_tensor(&[2, 4], &x))].into(),
        output_filter: vec![],
    };
    let resp = c
        .predict(req.clone())
        .await
        .expect("predict py")
        .into_inner();
    let y: Vec<f32> = x.iter().map(|v| v * 2.0 + 1.0).collect();
    assert_eq!(resp.outputs["y"].float_val, y);
    assert_eq!(resp.outputs["total"].float_val, vec![10.0, 9.5]);
    // output_filter returns only what was asked for.
    let filtered = c
        .predict(PredictRequest {
            output_filter: vec!["total".into()],
            ..req.clone()
        })
        .await
        .expect("filtered")
        .into_inner();
    assert_eq!(filtered.outputs.keys().collect::<Vec<_>>(), vec!["total"]);
    // More rows than max_batch_size (8) is refused, naming the limit.
    let big = PredictRequest {
        inputs: [("x".to_string(), f32_tensor(&[9, 4], &[0.0; 36]))].into(),
        ..req.clone()
    };
    let err = c.predict(big).await.expect_err("too large");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains('8'), "{}", err.message());

    // The config file is re-read: dropping 'py' from it stops serving py.
    std::fs::write(
        &config,
        format!(
            "model_config_list {{ config {{ name: 'mnist' base_path: '{}' }} }}\n",
            tmp.path().join("mnist").display()
        ),
    )
    .expect("rewrite config");
    let mut c2 = c.clone();
    eventually(LIMIT, "py removed after the config file changed", || {
        let mut c2 = c2.clone();
        let req = req.clone();
        async move {
            c2.predict(req)
                .await
                .err()
                .filter(|e| e.code() == Code::NotFound)
                .map(|_| ())
        }
    })
    .await;
    let _ = &mut c2;
}

/// TorchScript of a model whose forward pass takes about `x[0, 0]` × 0.25 ms and that counts
/// its calls in a buffer, answering the count as output `calls`.
const SLOW_MODEL: &str = r#"
import json, os, sys, torch
class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(1))
        self.register_buffer("w", torch.randn(256, 256) / 16)
    def forward(self, x):
        self.calls.add_(1)
        acc = torch.zeros(256, 256)
        for _ in range(int(x[0, 0].item())):
            acc = acc + self.w @ self.w
        return x + acc.sum() * 0.0, self.calls.expand(x.size(0), 1).clone()
out = os.path.join(sys.argv[1], "1")
os.makedirs(out)
torch.jit.script(Slow()).save(os.path.join(out, "model.pt"))
spec = lambda n, s: {"name": n, "dtype": "float32", "shape": s}
sig = {"method": "forward", "inputs": [spec("x", [-1, 1])], "outputs": [spec("y", [-1, 1]), spec("calls", [-1, 1])]}
json.dump({"signatures": {"serving_default": sig}}, open(os.path.join(out, "signature.json"), "w"))
"#;

/// A request whose deadline passes while it waits behind a slow one is answered
/// DEADLINE_EXCEEDED and never reaches the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_past_its_deadline_is_not_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    // torch.jit.script reads the module's source, so it must be a file.
    let script = tmp.path().join("slow_model.py");
    std::fs::write(&script, SLOW_MODEL).expect("write script");
    let status = Command::new(workspace_root().join(".venv/bin/python"))
        .arg(&script)
        .arg(tmp.path().join("slow"))
        .status()
        .expect("python");
    assert!(status.success());
    let server = Server::start(&[
        "--enable_batching",
        "--num-batch-threads=1",
        "--model_name=slow",
        &format!("--model_base_path={}", tmp.path().join("slow").display()),
    ]);
    server.wait_available("slow", 1, LIMIT).await;
    let c = server.predict_client().await;
    let req = |n: f32| PredictRequest {
        model_spec: Some(spec("slow", None)),
        inputs: [("x".to_string(), f32_tensor(&[1, 1], &[n]))].into(),
        output_filter: vec![],
    };
    // A occupies the only batch thread for about a second or more.
    let mut ca = c.clone();
    let a = tokio::spawn(async move { ca.predict(req(8000.0)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut b_req = tonic::Request::new(req(0.0));
    b_req.set_timeout(Duration::from_millis(150));
    let mut cb = c.clone();
    let b = cb
        .predict(b_req)
        .await
        .expect_err("B waited past its deadline");
    // gRPC clients enforce the deadline themselves too, so whichever side notices first
    // answers: DEADLINE_EXCEEDED from the server, CANCELLED ("Timeout expired") from tonic.
    assert!(
        matches!(b.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{b:?}"
    );
    let a = a.await.expect("join").expect("A ran").into_inner();
    let mut cc = c.clone();
    let c_resp = cc.predict(req(0.0)).await.expect("C ran").into_inner();
    let calls_a = a.outputs["calls"].float_val[0];
    let calls_c = c_resp.outputs["calls"].float_val[0];
    assert_eq!(
        calls_c,
        calls_a + 1.0,
        "B reached the model between A and C"
    );
}

/// TensorFlow Serving's own Python API (a client this project did not write) talks to
/// aspire-server: Predict with both encodings read from float_val, GetModelMetadata
/// unpacked into a SignatureDefMap, GetModelStatus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tf_serving_python_client_works_unchanged() {
    let python = workspace_root().join(".aspire-tfs-client/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh (make test does)",
        python.display()
    );
    let tmp = tempfile::tempdir().expect("tmp");
    export(&tmp.path().join("m"), 200, 1);
    let server = Server::start(&[
        "--model_name=mnist",
        &format!("--model_base_path={}", tmp.path().join("m").display()),
    ]);
    server.wait_available("mnist", 1, LIMIT).await;
    let addr = server.addr.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(workspace_root().join("tests/tf_serving_client.py"))
            .arg(addr)
            .arg(mnist_data())
            .output()
            .expect("run python client")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("metadata and status OK"), "{stdout}");
}
