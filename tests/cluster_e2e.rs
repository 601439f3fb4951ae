//! The cluster scenario with real processes: etcd, `aspire-discovery`, two
//! `aspire-worker`s and `aspire-router`, real TorchScript in real LibTorch, real gRPC on
//! loopback. A steady client runs through every step (a new version, a rollback by
//! editing the `pinned` key with `etcdctl`, an unpin, a worker killed with SIGKILL) and
//! must see zero failed requests. The times of each step are printed (`--nocapture`).

use std::process::Command;
use std::time::Instant;

use aspire_mnist::client::{ClientOptions, ClientReport, run_client};
use aspire_tests::stack::{LIMIT, Stack};
use aspire_tests::{mnist_data, wait_available};
use clap::Parser;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_scenario_loses_no_request() {
    let mut stack = Stack::start().await;
    let router_addr = stack.router_addr.clone();

    // 1000 images through the router.
    let v1 = client(&router_addr, 1000).await;
    assert_eq!(v1.failed_rpcs(), 0, "{}", v1.counts_line());
    assert_eq!(v1.versions.get(&1), Some(&1000), "{}", v1.counts_line());

    // Steady clients through every step.
    let steady = stack.steady_clients(3).await;

    // Copy v2 in: the router's default answers come from v2.
    let t = Instant::now();
    stack.add_version(2);
    let to_v2 = stack.wait_default(2, t).await;
    println!("copy v2 -> v2 served by default: {to_v2:?}");

    // Roll back with etcdctl: v1 loads again, then default requests get v1.
    let t = Instant::now();
    stack.pin(Some("1"));
    wait_available(&router_addr, "mnist", 1, LIMIT).await;
    let v1_available = t.elapsed();
    let t_avail = Instant::now();
    let to_v1 = stack.wait_default(1, t).await;
    println!(
        "pin 1 -> v1 AVAILABLE: {v1_available:?}; -> v1 served by default: {to_v1:?} ({:?} after AVAILABLE was seen)",
        t_avail.elapsed()
    );

    // aspirectl refuses a pin to a version that is not available, listing those that are.
    let out = Command::new(aspire_tests::bin("aspirectl"))
        .args(&stack.etcd_flags)
        .args(["pin", "mnist", "9"])
        .output()
        .expect("aspirectl");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("available: 1, 2"), "{err}");

    // Garbage in `pinned` is ignored as a whole: v1 stays (the pin is invalid, so the
    // aspired v2 is desired again; v1 keeps serving until v2 is AVAILABLE).
    stack.pin(Some("1,x"));
    let status = stack.status();
    assert!(status.contains("IGNORED"), "{status}");

    // Unpin: v2 back.
    let t = Instant::now();
    stack.pin(None);
    let to_v2_again = stack.wait_default(2, t).await;
    println!("unpin -> v2 served by default: {to_v2_again:?}");

    // Kill one worker: requests keep succeeding on the other. Both serve v2 first (the
    // scenario's premise: the other worker has the version).
    stack.wait_on_workers(2, 2).await;
    let killed_at = Instant::now();
    stack.workers[0].kill();
    let v2 = client(&router_addr, 1000).await;
    // Until w1's lease has expired (the registry no longer lists it), then on: the
    // steady clients answered through both the router's own discovery of the loss and
    // the registry's.
    aspire_tests::eventually(LIMIT, "w1's lease expired", || {
        let status = stack.status();
        async move { (!status.contains("w1 ")).then_some(()) }
    })
    .await;
    let expired_at = Instant::now();
    aspire_tests::eventually(LIMIT, "steady answers after w1's lease expired", || {
        let n = steady.answers_after(expired_at);
        async move { (n >= 50).then_some(()) }
    })
    .await;

    let s = steady.stop().await;
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
    stack.wait_on_workers(1, 2).await;
    let steady = stack.steady_clients(4).await;
    aspire_tests::eventually(LIMIT, "steady answers", || {
        let n = steady.seen().ok;
        async move { (n >= 50).then_some(()) }
    })
    .await;
    let stopped_at = Instant::now();
    assert_eq!(
        stack.workers[0].terminate(),
        Some(0),
        "worker exits cleanly on SIGTERM"
    );
    let drain = stopped_at.elapsed();
    aspire_tests::eventually(LIMIT, "w1 deregistered", || {
        let status = stack.status();
        async move { (!status.contains("w1 ")).then_some(()) }
    })
    .await;
    // Requests go on, all to w2, after w1 is gone.
    let gone_at = Instant::now();
    aspire_tests::eventually(LIMIT, "steady answers after w1 left", || {
        let n = steady.answers_after(gone_at);
        async move { (n >= 200).then_some(()) }
    })
    .await;
    let s = steady.stop().await;
    let after = s.answers.iter().filter(|(at, _)| *at > stopped_at).count();
    println!(
        "SIGTERM drain took {drain:?}; {} requests, {} failed, {after} after the SIGTERM",
        s.ok + s.failures.len(),
        s.failures.len()
    );
    assert!(s.failures.is_empty(), "failed requests: {:?}", s.failures);
    assert!(after > 0, "nothing was served after the SIGTERM");
}
