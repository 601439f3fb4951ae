//! The cluster scenario with real processes: etcd, `aspire-discovery`, two
//! `aspire-worker`s and `aspire-router`, real TorchScript in real LibTorch, real gRPC on
//! loopback. A steady client runs through every step (a new version, a rollback by
//! editing the `pinned` key with `etcdctl`, an unpin, a worker killed with SIGKILL) and
//! must see zero failed requests. The times of each step are printed (`--nocapture`).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aspire_mnist::client::{ClientOptions, ClientReport, build_request, run_client};
use aspire_proto::serving::model_spec::VersionChoice;
use aspire_proto::serving::prediction_service_client::PredictionServiceClient;
use aspire_registry::etcd_server::EtcdServer;
use aspire_tests::{
    Process, channel, copy_dir, eventually, export, free_port, mnist_data, wait_available,
};
use clap::Parser;

const LIMIT: Duration = Duration::from_secs(90);
const PREFIX: &str = "/e2e";

fn etcdctl(endpoint: &str, args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn client(addr: &str, num_tests: usize) -> ClientReport {
    let opts = ClientOptions::parse_from([
        "mnist-client".to_string(),
        format!("--num_tests={num_tests}"),
        format!("--server={addr}"),
        "--concurrency=10".to_string(),
        format!("--data={}", mnist_data()),
        "--timeout-ms=30000".to_string(),
    ]);
    run_client(&opts).await.expect("client ran")
}

/// The version that answers a default request through the router.
async fn default_version(
    c: &mut PredictionServiceClient<tonic::transport::Channel>,
) -> Option<i64> {
    let req = build_request(&ClientOptions::parse_from(["mnist-client"]), &[0.0; 784]);
    match c
        .predict(req)
        .await
        .ok()?
        .into_inner()
        .model_spec?
        .version_choice?
    {
        VersionChoice::Version(v) => Some(v),
        VersionChoice::VersionLabel(_) => None,
    }
}

/// Waits until default requests are answered by `version`; returns how long it took.
async fn wait_default(addr: &str, version: i64, since: Instant) -> Duration {
    let c = PredictionServiceClient::new(channel(addr).await);
    eventually(
        LIMIT,
        &format!("default requests answered by v{version}"),
        || {
            let mut c = c.clone();
            async move { (default_version(&mut c).await == Some(version)).then(|| since.elapsed()) }
        },
    )
    .await
}

#[derive(Default)]
struct Steady {
    ok: usize,
    failures: Vec<String>,
    /// (when, version) of every answer, to count what was served after a kill.
    answers: Vec<(Instant, i64)>,
}

/// Waits until the steady clients have had `n` answers after `since`: instead of a fixed
/// sleep, an event that proves the load went on past whatever happened before `since`.
async fn answers_after(steady: &Arc<Mutex<Steady>>, since: Instant, n: usize, what: &str) {
    eventually(LIMIT, what, || {
        let count = steady
            .lock()
            .expect("lock")
            .answers
            .iter()
            .filter(|(at, _)| *at > since)
            .count();
        async move { (count >= n).then_some(()) }
    })
    .await;
}

/// etcd, discovery, two workers and the router, on loopback, serving mnist v1 (and v2
/// exported beside it).
struct Stack {
    etcd: EtcdServer,
    tmp: tempfile::TempDir,
    etcd_flags: Vec<String>,
    _discovery: Process,
    workers: Vec<Process>,
    router: Process,
    router_addr: String,
}

impl Stack {
    async fn start() -> Stack {
        let started = Instant::now();
        let etcd = EtcdServer::start().expect("etcd");
        let endpoint = etcd.endpoint();
        let tmp = tempfile::tempdir().expect("tmp");
        let exported = tmp.path().join("mnist_model");
        export(&exported, 100, 1);
        export(&exported, 2000, 2);
        let monitored = tmp.path().join("monitored");
        copy_dir(&exported.join("1"), &monitored.join("1"));

        let etcd_flags = vec![
            format!("--etcd-endpoints={endpoint}"),
            format!("--prefix={PREFIX}"),
        ];
        let discovery = Process::start(
            "aspire-discovery",
            &[
                &etcd_flags[..],
                &[
                    "--model_name=mnist".into(),
                    format!("--model_base_path={}", monitored.display()),
                ],
            ]
            .concat(),
        );
        let mut workers = Vec::new();
        for id in ["w1", "w2"] {
            let port = free_port();
            let mut w = Process::start(
                "aspire-worker",
                &[
                    &etcd_flags[..],
                    &[
                        "--host=127.0.0.1".into(),
                        format!("--port={port}"),
                        format!("--worker-id={id}"),
                        format!("--storage-root={}", monitored.display()),
                        "--lease-ttl=3".into(),
                        "--metrics-port=0".into(),
                        "--enable_batching".into(),
                    ],
                ]
                .concat(),
            );
            w.wait_listening(&format!("127.0.0.1:{port}"));
            workers.push(w);
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
                ],
            ]
            .concat(),
        );
        router.wait_listening(&router_addr);
        wait_available(&router_addr, "mnist", 1, LIMIT).await;
        println!("stack up, v1 served, after {:?}", started.elapsed());
        Stack {
            etcd,
            tmp,
            etcd_flags,
            _discovery: discovery,
            workers,
            router,
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

    /// Starts `n` steady clients through the router; they run until `stop`.
    async fn steady_clients(
        &self,
        n: usize,
        stop: &Arc<AtomicBool>,
    ) -> (Arc<Mutex<Steady>>, Vec<tokio::task::JoinHandle<()>>) {
        let steady = Arc::new(Mutex::new(Steady::default()));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let mut c = PredictionServiceClient::new(channel(&self.router_addr).await);
            let (stop, steady) = (stop.clone(), steady.clone());
            let data = aspire_mnist::data::load(Path::new(&mnist_data())).expect("data");
            tasks.push(tokio::spawn(async move {
                let opts = ClientOptions::parse_from(["mnist-client"]);
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let mut req = tonic::Request::new(build_request(
                        &opts,
                        data.test.image(i % data.test.len()),
                    ));
                    req.set_timeout(Duration::from_secs(30));
                    let result = c.predict(req).await;
                    let mut s = steady.lock().expect("lock");
                    match result {
                        Ok(r) => {
                            s.ok += 1;
                            if let Some(VersionChoice::Version(v)) =
                                r.into_inner().model_spec.and_then(|m| m.version_choice)
                            {
                                s.answers.push((Instant::now(), v));
                            }
                        }
                        Err(e) => s.failures.push(format!("{:?}: {}", e.code(), e.message())),
                    }
                    i += 1;
                }
            }));
        }
        (steady, tasks)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_scenario_loses_no_request() {
    let mut stack = Stack::start().await;
    let endpoint = stack.etcd.endpoint();
    let router_addr = stack.router_addr.clone();
    let etcd_flags = stack.etcd_flags.clone();
    let exported = stack.tmp.path().join("mnist_model");
    let monitored = stack.tmp.path().join("monitored");

    // 1000 images through the router.
    let v1 = client(&router_addr, 1000).await;
    assert_eq!(v1.failed_rpcs(), 0, "{}", v1.counts_line());
    assert_eq!(v1.versions.get(&1), Some(&1000), "{}", v1.counts_line());

    // A steady client through every step.
    let stop = Arc::new(AtomicBool::new(false));
    let (steady, tasks) = stack.steady_clients(3, &stop).await;

    // Copy v2 in: the router's default answers come from v2.
    let t = Instant::now();
    copy_dir(&exported.join("2"), &monitored.join("2"));
    let to_v2 = wait_default(&router_addr, 2, t).await;
    println!("copy v2 -> v2 served by default: {to_v2:?}");

    // Roll back with etcdctl: v1 loads again, then default requests get v1.
    let t = Instant::now();
    etcdctl(
        &endpoint,
        &["put", &format!("{PREFIX}/models/mnist/pinned"), "1"],
    );
    wait_available(&router_addr, "mnist", 1, LIMIT).await;
    let v1_available = t.elapsed();
    let t_avail = Instant::now();
    let to_v1 = wait_default(&router_addr, 1, t).await;
    println!(
        "pin 1 -> v1 AVAILABLE: {v1_available:?}; -> v1 served by default: {to_v1:?} ({:?} after AVAILABLE was seen)",
        t_avail.elapsed()
    );

    // aspirectl refuses a pin to a version that is not available, listing those that are.
    let out = Command::new(aspire_tests::bin("aspirectl"))
        .args(&etcd_flags)
        .args(["pin", "mnist", "9"])
        .output()
        .expect("aspirectl");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("available: 1, 2"), "{err}");

    // Garbage in `pinned` is ignored as a whole: v1 stays (the pin is invalid, so the
    // aspired v2 is desired again; v1 keeps serving until v2 is AVAILABLE).
    etcdctl(
        &endpoint,
        &["put", &format!("{PREFIX}/models/mnist/pinned"), "1,x"],
    );
    let status = stack.status();
    assert!(status.contains("IGNORED"), "{status}");

    // Unpin: v2 back.
    let t = Instant::now();
    etcdctl(
        &endpoint,
        &["del", &format!("{PREFIX}/models/mnist/pinned")],
    );
    let to_v2_again = wait_default(&router_addr, 2, t).await;
    println!("unpin -> v2 served by default: {to_v2_again:?}");

    // Kill one worker: requests keep succeeding on the other. Both serve v2 first (the
    // scenario's premise: the other worker has the version).
    eventually(LIMIT, "both workers serve v2", || {
        let status = stack.status();
        async move { (status.matches("mnist v2: AVAILABLE").count() == 2).then_some(()) }
    })
    .await;
    let killed_at = Instant::now();
    stack.workers[0].kill();
    // Not a fixed sleep: wait until etcd has forgotten w1 (its 3 s lease expired, so the
    // router's watch drops it), then for answers after that, so the window checked for
    // failures surely covers the router's reaction to the loss.
    eventually(LIMIT, "w1's registration expired", || {
        let status = stack.status();
        async move { (!status.contains("w1 ")).then_some(()) }
    })
    .await;
    answers_after(&steady, Instant::now(), 50, "answers after w1 expired").await;
    let v2 = client(&router_addr, 1000).await;

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("steady client");
    }
    let s = steady.lock().expect("lock");
    let after_kill = s.answers.iter().filter(|(at, _)| *at > killed_at).count();
    println!(
        "steady client: {} requests, {} failed; {after_kill} served after the SIGKILL; v1 error rate {:.1}%, v2 error rate {:.1}%",
        s.ok + s.failures.len(),
        s.failures.len(),
        100.0 * v1.error_rate(),
        100.0 * v2.error_rate()
    );
    assert!(s.failures.is_empty(), "failed requests: {:?}", s.failures);
    assert!(after_kill > 0, "nothing was served after the kill");
    assert_eq!(v2.failed_rpcs(), 0, "{}", v2.counts_line());
    assert_eq!(v2.versions.get(&2), Some(&1000), "{}", v2.counts_line());
    assert!(v2.error_rate() < v1.error_rate());
    assert_eq!(
        stack.router.terminate(),
        Some(0),
        "router exits cleanly on SIGTERM"
    );
}

/// A worker stopped with SIGTERM under load (as Kubernetes stops a pod) deregisters first,
/// finishes what is in flight and exits 0: no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_costs_no_request() {
    let mut stack = Stack::start().await;
    eventually(LIMIT, "both workers serve v1", || {
        let status = stack.status();
        async move { (status.matches("mnist v1: AVAILABLE").count() == 2).then_some(()) }
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let load_from = Instant::now();
    let (steady, tasks) = stack.steady_clients(4, &stop).await;
    answers_after(&steady, load_from, 20, "the steady clients answered").await;
    let stopped_at = Instant::now();
    assert_eq!(
        stack.workers[0].terminate(),
        Some(0),
        "worker exits cleanly on SIGTERM"
    );
    let drain = stopped_at.elapsed();
    eventually(LIMIT, "w1 deregistered", || {
        let status = stack.status();
        async move { (!status.contains("w1 ")).then_some(()) }
    })
    .await;
    // Answers after the deregistration prove the router served on through it.
    answers_after(&steady, Instant::now(), 50, "answers after w1 deregistered").await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("steady client");
    }
    let s = steady.lock().expect("lock");
    let after = s.answers.iter().filter(|(at, _)| *at > stopped_at).count();
    println!(
        "SIGTERM drain took {drain:?}; {} requests, {} failed, {after} after the SIGTERM",
        s.ok + s.failures.len(),
        s.failures.len()
    );
    assert!(s.failures.is_empty(), "failed requests: {:?}", s.failures);
    assert!(after > 0, "nothing was served after the SIGTERM");
}
