//! Hostile input against real processes: requests that declare huge sizes, malformed
//! tensors and oversized messages are refused with their code and message while the
//! server stays up and its memory does not grow; through the router a refused request
//! reaches one worker only; and many clients sending large requests against a small
//! in-flight budget are shed while the server's memory stays bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aspire_proto::serving::PredictRequest;
use aspire_proto::{TensorProto, TensorShapeProto, tensorflow::tensor_shape_proto::Dim};
use aspire_registry::etcd_server::EtcdServer;
use aspire_tests::{
    Process, Server, export, free_port, rss_bytes, scrape_sum, spec, wait_available,
};
use bytes::Bytes;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(90);
const MIB: u64 = 1 << 20;

fn shape(dims: &[i64]) -> Option<TensorShapeProto> {
    Some(TensorShapeProto {
        dim: dims
            .iter()
            .map(|&size| Dim {
                size,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    })
}

fn request(model: &str, signature: &str, input: &str, tensor: TensorProto) -> PredictRequest {
    let mut model_spec = spec(model, None);
    model_spec.signature_name = signature.to_string();
    PredictRequest {
        model_spec: Some(model_spec),
        inputs: [(input.to_string(), tensor)].into(),
        output_filter: vec![],
    }
}

/// One float value and a declared shape: the 60-byte request that once took a server down.
fn broadcast(dims: &[i64]) -> TensorProto {
    TensorProto {
        dtype: 1,
        tensor_shape: shape(dims),
        float_val: vec![0.5],
        ..Default::default()
    }
}

/// The TF DataType numbers Aspire serves, with one value in their typed field.
fn one_value_of_every_dtype(dims: &[i64]) -> Vec<(i32, TensorProto)> {
    let base = || TensorProto {
        tensor_shape: shape(dims),
        ..Default::default()
    };
    vec![
        (
            1,
            TensorProto {
                dtype: 1,
                float_val: vec![1.0],
                ..base()
            },
        ),
        (
            2,
            TensorProto {
                dtype: 2,
                double_val: vec![1.0],
                ..base()
            },
        ),
        (
            3,
            TensorProto {
                dtype: 3,
                int_val: vec![1],
                ..base()
            },
        ),
        (
            4,
            TensorProto {
                dtype: 4,
                int_val: vec![1],
                ..base()
            },
        ),
        (
            5,
            TensorProto {
                dtype: 5,
                int_val: vec![1],
                ..base()
            },
        ),
        (
            6,
            TensorProto {
                dtype: 6,
                int_val: vec![1],
                ..base()
            },
        ),
        (
            9,
            TensorProto {
                dtype: 9,
                int64_val: vec![1],
                ..base()
            },
        ),
        (
            10,
            TensorProto {
                dtype: 10,
                bool_val: vec![true],
                ..base()
            },
        ),
        (
            14,
            TensorProto {
                dtype: 14,
                half_val: vec![1],
                ..base()
            },
        ),
        (
            19,
            TensorProto {
                dtype: 19,
                half_val: vec![1],
                ..base()
            },
        ),
    ]
}

/// An mnist model with its signature and the same TorchScript file without one, served
/// by one `aspire-server` with an 8 MiB message limit.
struct TwoModels {
    _tmp: tempfile::TempDir,
    server: Server,
}

async fn two_models() -> TwoModels {
    let tmp = tempfile::tempdir().expect("tmp");
    export(&tmp.path().join("mnist"), 20, 1);
    let untyped = tmp.path().join("untyped/1");
    std::fs::create_dir_all(&untyped).expect("mkdir");
    std::fs::copy(
        tmp.path().join("mnist/1/model.pt"),
        untyped.join("model.pt"),
    )
    .expect("copy");
    let config = tmp.path().join("models.config");
    std::fs::write(
        &config,
        format!(
            "model_config_list {{\n  config {{ name: 'mnist' base_path: '{}' }}\n  config {{ name: 'untyped' base_path: '{}' }}\n}}\n",
            tmp.path().join("mnist").display(),
            tmp.path().join("untyped").display()
        ),
    )
    .expect("config");
    let server = Server::start(&[
        &format!("--model_config_file={}", config.display()),
        "--max-message-size-bytes=8388608",
    ]);
    server.wait_available("mnist", 1, LIMIT).await;
    server.wait_available("untyped", 1, LIMIT).await;
    TwoModels { _tmp: tmp, server }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_cost_no_memory() {
    let TwoModels { _tmp, server } = two_models().await;
    let mut c = server.predict_client().await;
    let good = request(
        "mnist",
        "predict_images",
        "images",
        TensorProto {
            dtype: 1,
            tensor_shape: shape(&[1, 784]),
            float_val: vec![0.5; 784],
            ..Default::default()
        },
    );
    c.predict(good.clone()).await.expect("a good request");
    let rss_before = rss_bytes(server.pid());

    let mut cases: Vec<(String, PredictRequest, Code, &str)> = vec![
        (
            "one float_val declared [1073741824, 784]".into(),
            request(
                "mnist",
                "predict_images",
                "images",
                broadcast(&[1 << 30, 784]),
            ),
            Code::InvalidArgument,
            "rows",
        ),
        (
            "one float_val declared [1048576, 784] (3.3 GB decoded)".into(),
            request(
                "mnist",
                "predict_images",
                "images",
                broadcast(&[1 << 20, 784]),
            ),
            Code::InvalidArgument,
            "the limit is 268435456 bytes per request (--max-request-bytes)",
        ),
        (
            "a shape whose element count overflows".into(),
            request(
                "untyped",
                "",
                "input",
                broadcast(&[1 << 20, 1 << 62, 1 << 62]),
            ),
            Code::InvalidArgument,
            "too large",
        ),
        (
            "tensor_content shorter than its shape".into(),
            request(
                "mnist",
                "predict_images",
                "images",
                TensorProto {
                    dtype: 1,
                    tensor_shape: shape(&[1000, 784]),
                    tensor_content: Bytes::from(vec![0u8; 3136]),
                    ..Default::default()
                },
            ),
            Code::InvalidArgument,
            "tensor_content has 3136 bytes",
        ),
        (
            "zero rows".into(),
            request("mnist", "predict_images", "images", broadcast(&[0, 784])),
            Code::InvalidArgument,
            "0 rows",
        ),
        (
            "model without signature, one value declared [1048576, 1048576]".into(),
            request("untyped", "", "input", broadcast(&[1 << 20, 1 << 20])),
            Code::InvalidArgument,
            "(--max-request-bytes)",
        ),
        (
            "model without signature, a scalar".into(),
            request("untyped", "", "input", broadcast(&[])),
            Code::InvalidArgument,
            "scalar",
        ),
        (
            "a 9 MiB message over the 8 MiB gRPC limit".into(),
            request(
                "mnist",
                "predict_images",
                "images",
                TensorProto {
                    dtype: 1,
                    tensor_shape: shape(&[3000, 784]),
                    tensor_content: Bytes::from(vec![0u8; 3000 * 784 * 4]),
                    ..Default::default()
                },
            ),
            Code::InvalidArgument,
            "at most 8388608 bytes (--max-message-size-bytes)",
        ),
    ];
    for (dtype, tensor) in one_value_of_every_dtype(&[1 << 20, 1 << 20]) {
        // Refused for its size when it is the signature's dtype, else for its dtype.
        let expect = if dtype == 1 {
            "(--max-request-bytes)"
        } else {
            "the signature expects DT_FLOAT"
        };
        cases.push((
            format!("untyped model, dtype {dtype} declared [1048576, 1048576]"),
            request("untyped", "", "input", tensor),
            Code::InvalidArgument,
            expect,
        ));
    }
    for (what, req, code, needle) in cases {
        let err = c.predict(req).await.expect_err(&what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(err.message().contains(needle), "{what}: {}", err.message());
        println!("{what}: {:?} {}", err.code(), err.message());
    }
    // Alive, still serving, and no bigger.
    c.predict(good).await.expect("the server still serves");
    let grown = rss_bytes(server.pid()).saturating_sub(rss_before);
    println!("RSS grew by {} KiB", grown / 1024);
    assert!(grown < 64 * MIB, "RSS grew by {} MiB", grown / MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_router_a_refused_request_reaches_one_worker_only() {
    let etcd = EtcdServer::start().expect("etcd");
    let tmp = tempfile::tempdir().expect("tmp");
    export(&tmp.path().join("mnist"), 20, 1);
    let etcd_flags = [
        format!("--etcd-endpoints={}", etcd.endpoint()),
        "--prefix=/hostile".to_string(),
    ];
    let _discovery = Process::start(
        "aspire-discovery",
        &[
            &etcd_flags[..],
            &[
                "--model_name=mnist".into(),
                format!("--model_base_path={}", tmp.path().join("mnist").display()),
            ],
        ]
        .concat(),
    );
    let mut workers = Vec::new();
    let mut addresses = Vec::new();
    let mut metrics = Vec::new();
    for id in ["w1", "w2"] {
        let (port, metrics_port) = (free_port(), free_port());
        let mut w = Process::start(
            "aspire-worker",
            &[
                &etcd_flags[..],
                &[
                    "--host=127.0.0.1".into(),
                    format!("--port={port}"),
                    format!("--worker-id={id}"),
                    format!("--metrics-port={metrics_port}"),
                    format!("--storage-root={}", tmp.path().join("mnist").display()),
                ],
            ]
            .concat(),
        );
        w.wait_listening(&format!("127.0.0.1:{port}"));
        workers.push(w);
        addresses.push(format!("127.0.0.1:{port}"));
        metrics.push(format!("127.0.0.1:{metrics_port}"));
    }
    let router_port = free_port();
    let router_addr = format!("127.0.0.1:{router_port}");
    let mut router = Process::start(
        "aspire-router",
        &[
            &etcd_flags[..],
            &[
                "--host=127.0.0.1".into(),
                format!("--port={router_port}"),
                "--metrics-port=0".into(),
                "--max-message-size-bytes=8388608".into(),
            ],
        ]
        .concat(),
    );
    router.wait_listening(&router_addr);
    for addr in &addresses {
        wait_available(addr, "mnist", 1, LIMIT).await;
    }
    wait_available(&router_addr, "mnist", 1, LIMIT).await;
    let mut c = aspire_proto::serving::prediction_service_client::PredictionServiceClient::new(
        aspire_tests::channel(&router_addr).await,
    );
    let invalid = || -> f64 {
        metrics
            .iter()
            .map(|m| scrape_sum(m, "aspire_worker_requests_total", "code", "InvalidArgument"))
            .sum()
    };
    let before = invalid();
    let hostile = [
        broadcast(&[1 << 20, 784]),
        broadcast(&[1 << 30, 784]),
        broadcast(&[0, 784]),
    ];
    for (i, tensor) in hostile.iter().enumerate() {
        let err = c
            .predict(request("mnist", "predict_images", "images", tensor.clone()))
            .await
            .expect_err("hostile");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(
            invalid() - before,
            (i + 1) as f64,
            "a refused request was retried"
        );
    }
    // A message over the router's limit never reaches a worker at all.
    let big = TensorProto {
        dtype: 1,
        tensor_shape: shape(&[3000, 784]),
        tensor_content: Bytes::from(vec![0u8; 3000 * 784 * 4]),
        ..Default::default()
    };
    let err = c
        .predict(request("mnist", "predict_images", "images", big))
        .await
        .expect_err("too big");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("(--max-message-size-bytes)"),
        "{}",
        err.message()
    );
    assert_eq!(invalid() - before, hostile.len() as f64);
    for w in &mut workers {
        assert!(w.is_running(), "a worker died:\n{}", w.log());
    }
}

/// Samples the RSS of `pid` every 10 ms into `peak` until `stop`.
fn sample_peak_rss(
    pid: u32,
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            peak.fetch_max(rss_bytes(pid), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_past_a_small_budget_are_shed_and_memory_stays_bounded() {
    const BUDGET: u64 = 64 * MIB;
    // The stated margin over budget + model: tonic's and hyper's buffers, the decoded
    // proto's bookkeeping, outputs, and allocator slack.
    const MARGIN: u64 = 96 * MIB;
    let tmp = tempfile::tempdir().expect("tmp");
    export(&tmp.path().join("mnist"), 20, 1);
    let server = Server::start(&[
        "--model_name=mnist",
        &format!("--model_base_path={}", tmp.path().join("mnist").display()),
        &format!("--max-inflight-bytes={BUDGET}"),
        "--max-message-size-bytes=16777216",
        "--max-request-bytes=16777216",
    ]);
    server.wait_available("mnist", 1, LIMIT).await;
    // 2,600 rows of 784 floats in tensor_content: 8.2 MB a request.
    let rows = 2600;
    let big = request(
        "mnist",
        "predict_images",
        "images",
        TensorProto {
            dtype: 1,
            tensor_shape: shape(&[rows, 784]),
            tensor_content: Bytes::from(vec![0u8; rows as usize * 784 * 4]),
            ..Default::default()
        },
    );
    let mut warm = server.predict_client().await;
    for _ in 0..3 {
        warm.predict(big.clone())
            .await
            .expect("one large request alone fits");
    }
    let baseline = rss_bytes(server.pid());
    let (stop, peak) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let sampler = sample_peak_rss(server.pid(), stop.clone(), peak.clone());

    let clients = 32;
    let per_client = 8;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        // A connection each, as separate clients would have.
        let mut c = server.predict_client().await;
        let big = big.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..per_client {
                let started = Instant::now();
                let result = c.predict(big.clone()).await.map(|_| ());
                outcomes.push((result, started.elapsed()));
            }
            outcomes
        }));
    }
    let (mut ok, mut shed, mut shed_latency) = (0, 0, Vec::new());
    for t in tasks {
        for (result, took) in t.await.expect("client task") {
            match result {
                Ok(()) => ok += 1,
                Err(e) => {
                    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                    assert!(
                        e.message()
                            .contains("the worker's in-flight request budget is full")
                            && e.message().contains("(--max-inflight-bytes)"),
                        "{}",
                        e.message()
                    );
                    shed += 1;
                    shed_latency.push(took);
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let peak = peak.load(Ordering::Relaxed);
    shed_latency.sort();
    let median = shed_latency
        .get(shed_latency.len() / 2)
        .copied()
        .unwrap_or_default();
    println!(
        "{ok} answered, {shed} shed (median shed answer {median:?}); RSS baseline {} MiB, peak {} MiB (+{} MiB; budget {} MiB, margin {} MiB)",
        baseline / MIB,
        peak / MIB,
        peak.saturating_sub(baseline) / MIB,
        BUDGET / MIB,
        MARGIN / MIB
    );
    assert_eq!(ok + shed, clients * per_client);
    assert!(
        shed > 0,
        "32 clients x 8.2 MB never passed a 64 MiB budget?"
    );
    assert!(ok > 0, "nothing was answered");
    assert!(
        peak <= baseline + BUDGET + MARGIN,
        "RSS peaked at {} MiB over a baseline of {} MiB",
        peak / MIB,
        baseline / MIB
    );
    // Still serving after the storm.
    warm.predict(big).await.expect("serves after the load");
}
