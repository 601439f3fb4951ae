//! Models that misbehave, end to end with real processes and real TorchScript (the fault
//! model of `scripts/make_fault_model.py`: it raises on the input marker -999 and loops
//! for a while on -777):
//! - in `aspire-server` with batching, a request that makes the model raise fails alone,
//!   with the model's message, while the requests batched with it get their answers;
//! - in a cluster (etcd, discovery, a worker with two batch threads, the router), a
//!   request stuck in a long forward pass times out for its caller, a new version copied
//!   in meanwhile goes live, the old one unloads within the drain limit instead of
//!   waiting for the pass, the slow pass shows in `aspirectl status`, and steady clients
//!   see no failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aspire_proto::serving::PredictRequest;
use aspire_proto::serving::prediction_service_client::PredictionServiceClient;
use aspire_proto::{TensorProto, TensorShapeProto, tensorflow::tensor_shape_proto::Dim};
use aspire_registry::etcd_server::EtcdServer;
use aspire_tests::{
    Process, Server, channel, eventually, free_port, spec, wait_available, workspace_root,
};
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(90);

/// Units of the fault model's loop (10,000 rounds each, about 12 ms on a 2-core VM) that
/// keep a forward pass busy for some 18 s: far longer than the swap below takes.
const LONG_LOOP: f32 = 1500.0;

/// Units of the loop that keep the batch thread busy for some 3 s.
const SHORT_LOOP: f32 = 250.0;

/// Writes version `version` of the fault model under `dir`.
fn make_fault_model(dir: &Path, version: u32) {
    let out = Command::new(workspace_root().join(".venv/bin/python"))
        .arg(workspace_root().join("scripts/make_fault_model.py"))
        .arg(dir)
        .arg(format!("--version={version}"))
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "make_fault_model.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One row `[first, second, 0, 0]` for the fault model.
fn request(first: f32, second: f32, version: Option<i64>) -> PredictRequest {
    PredictRequest {
        model_spec: Some(spec("faulty", version)),
        inputs: [(
            "x".to_string(),
            TensorProto {
                dtype: 1,
                tensor_shape: Some(TensorShapeProto {
                    dim: [1, 4]
                        .iter()
                        .map(|&size| Dim {
                            size,
                            name: String::new(),
                        })
                        .collect(),
                    unknown_rank: false,
                }),
                float_val: vec![first, second, 0.0, 0.0],
                ..Default::default()
            },
        )]
        .into(),
        output_filter: vec![],
    }
}

/// What the model answers for a row `[first, second, 0, 0]` it does not fail on.
fn expected(first: f32, second: f32) -> Vec<f32> {
    vec![first * 2.0 + 1.0, second * 2.0 + 1.0, 1.0, 1.0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_raising_request_fails_alone_and_its_batch_mates_are_answered() {
    let tmp = tempfile::tempdir().expect("tmp");
    let models = tmp.path().join("faulty");
    make_fault_model(&models, 1);
    let metrics_port = free_port();
    let server = Server::start(&[
        "--model_name=faulty",
        &format!("--model_base_path={}", models.display()),
        "--enable_batching",
        "--max-batch-size=8",
        "--num-batch-threads=1",
        "--slow-pass-seconds=1",
        &format!("--metrics-port={metrics_port}"),
    ]);
    server.wait_available("faulty", 1, LIMIT).await;
    let c = server.predict_client().await;

    // The one batch thread is kept busy for a moment (some 3 s), so the requests below
    // queue up and share the next forward pass.
    let holder = {
        let mut c = c.clone();
        tokio::spawn(async move { c.predict(request(-777.0, SHORT_LOOP, None)).await })
    };
    // Its pass is running once it is past --slow-pass-seconds (1 s).
    let metrics = format!("127.0.0.1:{metrics_port}");
    eventually(LIMIT, "the holder's pass running past 1 s", || {
        let running = aspire_tests::scrape_sum(
            &metrics,
            "aspire_worker_slow_passes_running",
            "model",
            "faulty",
        );
        async move { (running == 1.0).then_some(()) }
    })
    .await;
    let firsts = [1.0, 2.0, 3.0, -999.0, 4.0, 5.0];
    let mut asks = Vec::new();
    for first in firsts {
        let mut c = c.clone();
        asks.push(tokio::spawn(async move {
            c.predict(request(first, 0.5, None)).await
        }));
    }
    let held = holder.await.unwrap().expect("the holder's answer");
    assert_eq!(
        held.into_inner().outputs["y"].float_val,
        expected(-777.0, SHORT_LOOP)
    );
    for (first, ask) in firsts.into_iter().zip(asks) {
        let answer = ask.await.unwrap();
        if first == -999.0 {
            let status = answer.expect_err("the marked request must fail");
            assert_eq!(status.code(), Code::Internal, "{status:?}");
            assert!(
                status
                    .message()
                    .contains("fault model: input row holds the raise marker -999"),
                "{}",
                status.message()
            );
        } else {
            let y = answer
                .unwrap_or_else(|e| panic!("request {first} failed: {e:?}"))
                .into_inner()
                .outputs["y"]
                .float_val
                .clone();
            assert_eq!(y, expected(first, 0.5), "request {first}");
        }
    }
    // Proof they were batched: a pass of several rows ran (and failed), then each alone.
    let passes = aspire_tests::scrape_sum(
        &metrics,
        "aspire_worker_forward_pass_seconds_count",
        "model",
        "faulty",
    );
    let rows =
        aspire_tests::scrape_sum(&metrics, "aspire_worker_batch_rows_sum", "model", "faulty");
    println!("{passes} forward passes, {rows} rows in all");
    assert!(
        rows > passes,
        "no forward pass held several requests ({passes} passes, {rows} rows)"
    );
    assert!(
        rows >= 1.0 + 2.0 * firsts.len() as f64,
        "the failed batch's requests did not run again one by one ({passes} passes, {rows} rows)"
    );
}

/// etcd, discovery of the fault model, one worker and a router.
struct Cluster {
    _etcd: EtcdServer,
    tmp: tempfile::TempDir,
    etcd_flags: Vec<String>,
    _processes: Vec<Process>,
    router_addr: String,
}

impl Cluster {
    async fn start(worker_args: &[&str]) -> Cluster {
        let etcd = EtcdServer::start().expect("etcd");
        let tmp = tempfile::tempdir().expect("tmp");
        make_fault_model(&tmp.path().join("exported"), 1);
        make_fault_model(&tmp.path().join("exported"), 2);
        aspire_tests::copy_dir(
            &tmp.path().join("exported/1"),
            &tmp.path().join("monitored/1"),
        );
        let etcd_flags = vec![
            format!("--etcd-endpoints={}", etcd.endpoint()),
            "--prefix=/faults".to_string(),
        ];
        let discovery = Process::start(
            "aspire-discovery",
            &[
                &etcd_flags[..],
                &[
                    "--model_name=faulty".into(),
                    format!(
                        "--model_base_path={}",
                        tmp.path().join("monitored").display()
                    ),
                    "--file_system_poll_wait_seconds=1".into(),
                ],
            ]
            .concat(),
        );
        let worker_port = free_port();
        let mut worker = Process::start(
            "aspire-worker",
            &[
                &etcd_flags[..],
                &[
                    "--host=127.0.0.1".into(),
                    format!("--port={worker_port}"),
                    "--worker-id=w1".into(),
                    format!("--storage-root={}", tmp.path().join("monitored").display()),
                    "--metrics-port=0".into(),
                    "--enable_batching".into(),
                ],
                &worker_args
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()[..],
            ]
            .concat(),
        );
        worker.wait_listening(&format!("127.0.0.1:{worker_port}"));
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
                    // Callers without a deadline of their own get one second.
                    "--request-timeout-ms=1000".into(),
                ],
            ]
            .concat(),
        );
        router.wait_listening(&router_addr);
        wait_available(&router_addr, "faulty", 1, LIMIT).await;
        Cluster {
            _etcd: etcd,
            tmp,
            etcd_flags,
            _processes: vec![discovery, worker, router],
            router_addr,
        }
    }

    fn status(&self) -> String {
        let out = Command::new(aspire_tests::bin("aspirectl"))
            .args(&self.etcd_flags)
            .arg("status")
            .output()
            .expect("aspirectl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn status_shows(&self, what: &str, line: &str) -> Instant {
        eventually(LIMIT, what, || {
            let found = self.status().contains(line);
            async move { found.then(Instant::now) }
        })
        .await
    }

    fn monitored(&self) -> PathBuf {
        self.tmp.path().join("monitored")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_pass_times_out_its_caller_and_the_old_version_still_unloads_in_time() {
    let drain = Duration::from_secs(2);
    let cluster = Cluster::start(&[
        "--num-batch-threads=2",
        &format!("--unload-drain-seconds={}", drain.as_secs()),
        "--slow-pass-seconds=1",
    ])
    .await;
    let router = PredictionServiceClient::new(channel(&cluster.router_addr).await);

    // Steady clients, naming no version, with a generous deadline.
    let stop = Arc::new(AtomicBool::new(false));
    let mut steady = Vec::new();
    for k in 0..2 {
        let (mut c, stop) = (router.clone(), stop.clone());
        steady.push(tokio::spawn(async move {
            let (mut ok, mut failures) = (0usize, Vec::new());
            let mut i = 0.0f32;
            while !stop.load(Ordering::Relaxed) {
                let mut req = tonic::Request::new(request(i + k as f32 * 0.5, 1.0, None));
                req.set_timeout(Duration::from_secs(30));
                match c.predict(req).await {
                    Ok(r) => {
                        let y = &r.get_ref().outputs["y"].float_val;
                        if *y == expected(i + k as f32 * 0.5, 1.0) {
                            ok += 1;
                        } else {
                            failures.push(format!("wrong answer {y:?} for {i}"));
                        }
                    }
                    Err(e) => failures.push(format!("{:?}: {}", e.code(), e.message())),
                }
                i += 1.0;
            }
            (ok, failures)
        }));
    }

    // A caller without a deadline hits the loop marker: the pass runs on, and the router
    // times the caller out after its --request-timeout-ms.
    let stuck = tonic::Request::new(request(-777.0, LONG_LOOP, None));
    let sent = Instant::now();
    let err = router
        .clone()
        .predict(stuck)
        .await
        .expect_err("the looping request cannot finish within the router's timeout");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("--request-timeout-ms"), "{err:?}");
    assert!(
        sent.elapsed() < Duration::from_secs(4),
        "{:?}",
        sent.elapsed()
    );
    // The pass still runs past --slow-pass-seconds, and the worker's record says so.
    cluster
        .status_shows(
            "the slow pass in aspirectl status",
            "faulty v1: SLOW PASSES 1 running now",
        )
        .await;

    // Version 2 is copied in meanwhile: it goes live, and version 1 unloads within its
    // grace and drain limit, without waiting for the pass.
    aspire_tests::copy_dir(
        &cluster.tmp.path().join("exported/2"),
        &cluster.monitored().join("2"),
    );
    let v2_at = cluster
        .status_shows("v2 AVAILABLE on the worker", "faulty v2: AVAILABLE")
        .await;
    let v1_end = cluster
        .status_shows("v1 END on the worker", "faulty v1: END")
        .await;
    let took = v1_end - v2_at;
    println!(
        "v1 END {took:?} after v2 AVAILABLE; the stuck request was sent {:?} before",
        v1_end - sent
    );
    // The worker's unload grace (2 s) plus the drain limit, plus the registry's lag.
    assert!(
        took < Duration::from_secs(2) + drain + Duration::from_secs(3),
        "v1 took {took:?} to unload"
    );
    let c = router.clone();
    eventually(LIMIT, "requests answered by v2", || {
        let mut c = c.clone();
        async move {
            let r = c.predict(request(1.0, 1.0, None)).await.ok()?;
            let version = r.into_inner().model_spec?.version_choice?;
            (version == aspire_proto::serving::model_spec::VersionChoice::Version(2)).then_some(())
        }
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failures) = (0, Vec::new());
    for s in steady {
        let (o, f) = s.await.unwrap();
        ok += o;
        failures.extend(f);
    }
    println!("steady clients: {ok} answers, {} failures", failures.len());
    assert!(ok > 0, "the steady clients got no answer");
    assert!(failures.is_empty(), "steady clients failed: {failures:?}");
}
