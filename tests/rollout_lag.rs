//! Rollouts through control-plane lag, with real processes (etcd, discovery, two workers,
//! the router; real TorchScript in LibTorch; real gRPC on loopback), steady clients
//! through every step, and zero failed requests:
//!
//! - the router's link to etcd is delayed by 4 s (a [`TcpProxy`]), longer than the
//!   workers' unload grace (2 s), through a v1→v2 rollout, a pin rollback and an unpin:
//!   workers unload versions the router still routes to, answer "version unloading",
//!   and the router picks again;
//! - etcd is frozen (SIGSTOP) for longer than the workers' lease TTL under load, then
//!   thawed: the router routes on its last table meanwhile, keeps workers whose records
//!   vanish while they answer, and the workers register again;
//! - every worker lease is revoked with etcdctl under load: the records vanish at once,
//!   the workers keep serving and register again.

use std::time::{Duration, Instant};

use aspire_registry::TcpProxy;
use aspire_tests::stack::{LIMIT, Stack, StackOptions};
use aspire_tests::{Process, eventually, free_port};

/// The value of the label-less counter `name` at `http://addr/metrics`.
fn counter(addr: &str, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the router's metrics"))
}

/// Replaces the stack's router with one whose etcd is `etcd` and whose metrics are
/// served on the returned address; waits until it serves version 1 again.
async fn restart_router(stack: &mut Stack, etcd: &str) -> String {
    assert_eq!(
        stack.router.terminate(),
        Some(0),
        "the first router exits cleanly"
    );
    let port = stack
        .router_addr
        .rsplit(':')
        .next()
        .expect("port")
        .to_string();
    let metrics_port = free_port();
    stack.router = Process::start(
        "aspire-router",
        &[
            format!("--etcd-endpoints={etcd}"),
            format!("--prefix={}", stack.options.prefix),
            "--host=127.0.0.1".into(),
            format!("--port={port}"),
            format!("--metrics-port={metrics_port}"),
        ],
    );
    stack.router.wait_listening(&stack.router_addr);
    stack.wait_default(1, Instant::now()).await;
    format!("127.0.0.1:{metrics_port}")
}

/// The etcd client address of `stack`, for a proxy.
fn etcd_addr(stack: &Stack) -> std::net::SocketAddr {
    stack
        .etcd
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("etcd address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_seen_4_s_late_by_the_router_loses_no_request() {
    let mut stack = Stack::start_with(StackOptions {
        prefix: "/lag".into(),
        ..StackOptions::default()
    })
    .await;
    let proxy = TcpProxy::start(etcd_addr(&stack)).expect("proxy");
    let metrics = restart_router(&mut stack, &proxy.url()).await;
    let steady = stack.steady_clients(3).await;
    let lag = Duration::from_secs(4);
    proxy.delay(lag);

    // v1 -> v2: the workers unload v1 (2 s grace) while the router still routes to it.
    let t = Instant::now();
    stack.add_version(2);
    // Clients may get v2 before the router's view has it: a worker that dropped v1
    // answers "unloading" with v2 as its default, and the router sends the request
    // there. The re-pick count below shows the lag was met.
    let to_v2 = stack.wait_default(2, t).await;
    println!("copy v2 -> v2 served by default through a {lag:?} lag: {to_v2:?}");

    // Roll back to v1 by pin, then unpin: each time the workers drop the version the
    // router still routes to.
    let t = Instant::now();
    stack.pin(Some("1"));
    let to_v1 = stack.wait_default(1, t).await;
    println!("pin 1 -> v1 served by default: {to_v1:?}");
    // Both workers have unloaded v2 before the unpin, so it is a fresh rollout.
    eventually(LIMIT, "v2 unloaded on both workers", || {
        let status = stack.status();
        async move { (!status.contains("mnist v2: AVAILABLE")).then_some(()) }
    })
    .await;
    let t = Instant::now();
    stack.pin(None);
    let to_v2 = stack.wait_default(2, t).await;
    println!("unpin -> v2 served by default: {to_v2:?}");
    // Some answers came after the last step.
    let last = Instant::now();
    eventually(LIMIT, "steady answers after the unpin", || {
        let n = steady.answers_after(last);
        async move { (n >= 20).then_some(()) }
    })
    .await;

    let s = steady.stop().await;
    let repicks = counter(&metrics, "aspire_router_repicks_total");
    let marked_down = counter(&metrics, "aspire_router_workers_marked_down_total");
    println!(
        "steady clients: {} requests, {} failed; {repicks} re-picks, {marked_down} workers marked down",
        s.ok + s.failures.len(),
        s.failures.len()
    );
    assert!(s.failures.is_empty(), "failed requests: {:?}", s.failures);
    assert!(
        repicks > 0.0,
        "no request met an unloaded version: the lag was not exercised"
    );
    assert_eq!(
        marked_down, 0.0,
        "a worker unloading a version was marked down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_frozen_past_the_lease_ttl_loses_no_request_and_workers_register_again() {
    let stack = Stack::start_with(StackOptions {
        prefix: "/freeze".into(),
        ..StackOptions::default()
    })
    .await;
    stack.wait_on_workers(1, 2).await;
    let steady = stack.steady_clients(3).await;
    let ttl = Duration::from_secs(stack.options.lease_ttl_secs);
    let frozen_at = Instant::now();
    stack.etcd.freeze().expect("freeze etcd");
    // Held frozen for twice the lease TTL while the clients keep asking.
    eventually(LIMIT, "answers while etcd is frozen", || {
        let n = steady.answers_after(frozen_at);
        let long_enough = frozen_at.elapsed() > ttl * 2;
        async move { (long_enough && n >= 20).then_some(()) }
    })
    .await;
    stack.etcd.thaw().expect("thaw etcd");
    let thawed_at = Instant::now();
    println!("etcd frozen for {:?}", thawed_at - frozen_at);
    eventually(LIMIT, "steady answers after the thaw", || {
        let n = steady.answers_after(thawed_at);
        async move { (n >= 20).then_some(()) }
    })
    .await;
    // Whether etcd expired the leases on the thaw or the workers' keep-alives came
    // first, both workers are listed, and the router has a registration for each
    // record that vanished.
    stack.wait_on_workers(1, 2).await;
    let vanished = stack.router.log().matches("registration vanished").count();
    eventually(
        LIMIT,
        "the router sees the vanished workers register again",
        || {
            let again = stack
                .router
                .log()
                .matches("worker registered again")
                .count();
            async move { (again >= vanished).then_some(()) }
        },
    )
    .await;
    println!(
        "workers listed again {:?} after the thaw",
        thawed_at.elapsed()
    );
    let s = steady.stop().await;
    println!(
        "steady clients: {} requests, {} failed; the router saw {vanished} worker records vanish",
        s.ok + s.failures.len(),
        s.failures.len()
    );
    assert!(s.failures.is_empty(), "failed requests: {:?}", s.failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_worker_leases_lose_no_request_and_workers_register_again() {
    let stack = Stack::start_with(StackOptions {
        prefix: "/revoke".into(),
        ..StackOptions::default()
    })
    .await;
    stack.wait_on_workers(1, 2).await;
    let steady = stack.steady_clients(3).await;
    let revoked_at = Instant::now();
    let leases = stack.etcdctl(&["lease", "list"]);
    // "found N leases", then one hexadecimal id a line.
    let ids: Vec<&str> = leases
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    assert!(!ids.is_empty(), "no lease to revoke: {leases}");
    for id in &ids {
        stack.etcdctl(&["lease", "revoke", id]);
    }
    // The router saw the records vanish and kept both workers (they still answer).
    eventually(LIMIT, "the router noticed the vanished records", || {
        let n = stack.router.log().matches("registration vanished").count();
        async move { (n >= 2).then_some(()) }
    })
    .await;
    stack.wait_on_workers(1, 2).await;
    eventually(LIMIT, "the router sees both workers register again", || {
        let again = stack
            .router
            .log()
            .matches("worker registered again")
            .count();
        async move { (again >= 2).then_some(()) }
    })
    .await;
    println!(
        "workers listed again {:?} after the revoke",
        revoked_at.elapsed()
    );
    let after = Instant::now();
    eventually(LIMIT, "steady answers after the re-registration", || {
        let n = steady.answers_after(after);
        async move { (n >= 20).then_some(()) }
    })
    .await;
    let s = steady.stop().await;
    println!(
        "steady clients: {} requests, {} failed",
        s.ok + s.failures.len(),
        s.failures.len()
    );
    assert!(s.failures.is_empty(), "failed requests: {:?}", s.failures);
    assert!(
        !stack.router.log().contains("dropping worker"),
        "a worker that kept answering was dropped:\n{}",
        stack.router.log()
    );
}

/// The state numbers of `mnist`'s versions as the server at `addr` reports them itself
/// (GetModelStatus straight to a worker: no etcd involved).
async fn version_states(addr: &str) -> Option<Vec<(i64, i32)>> {
    use aspire_proto::serving::GetModelStatusRequest;
    use aspire_proto::serving::model_service_client::ModelServiceClient;
    let mut client = ModelServiceClient::new(aspire_tests::channel(addr).await);
    let resp = client
        .get_model_status(GetModelStatusRequest {
            model_spec: Some(aspire_tests::spec("mnist", None)),
        })
        .await
        .ok()?;
    Some(
        resp.into_inner()
            .model_version_status
            .iter()
            .map(|s| (s.version, s.state))
            .collect(),
    )
}

/// etcd frozen for 5 s while the workers swap to a version they already know: the swap
/// (load v2, unload v1) completes during the freeze, since the workers' registry writes
/// are off their loading path, and requests are served throughout (the router, frozen
/// on its last view, routes to v1; the workers answer "unloading" and the router sends
/// them again to v2).
///
/// The workers learn of v2 before the freeze but cannot load it yet: its model file is
/// corrupt at first, so the load fails and is retried (1 s later). etcd is frozen, then
/// the good file is put in place; the retry loads it while etcd is frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_completes_while_etcd_is_frozen() {
    const AVAILABLE: i32 = 30;
    let stack = Stack::start_with(StackOptions {
        prefix: "/frozen-swap".into(),
        ..StackOptions::default()
    })
    .await;
    stack.wait_on_workers(1, 2).await;
    let steady = stack.steady_clients(3).await;

    // v2 arrives with a corrupt model file of the right size.
    let good = std::fs::read(stack.exported(2).join("model.pt")).expect("read model.pt");
    let staging = stack.tmp.path().join("staging");
    aspire_tests::copy_dir(&stack.exported(2), &staging.join("2"));
    std::fs::write(staging.join("2/model.pt"), vec![0x5a; good.len()]).expect("corrupt");
    std::fs::rename(staging.join("2"), stack.monitored().join("2")).expect("rename v2 in");
    eventually(LIMIT, "both workers fail to load the corrupt v2", || {
        let status = stack.status();
        async move { (status.matches("mnist v2: END").count() == 2).then_some(()) }
    })
    .await;

    let frozen_at = Instant::now();
    stack.etcd.freeze().expect("freeze etcd");
    std::fs::write(stack.monitored().join("2/model.pt"), &good).expect("repair model.pt");
    // Within the freeze, each worker says (itself, over gRPC) that v2 is AVAILABLE and
    // v1 no longer is.
    let freeze = Duration::from_secs(5);
    for addr in &stack.worker_addrs {
        let swapped = eventually(
            freeze,
            &format!("the swap on {addr} during the freeze"),
            || {
                let addr = addr.clone();
                async move {
                    let states = version_states(&addr).await?;
                    let has = |v: i64| states.iter().any(|(n, s)| *n == v && *s == AVAILABLE);
                    (has(2) && !has(1)).then(|| frozen_at.elapsed())
                }
            },
        )
        .await;
        println!("{addr} swapped {swapped:?} into the freeze");
    }
    // Hold the freeze for its full length under load.
    eventually(LIMIT, "the rest of the freeze", || {
        let n = steady.answers_after(frozen_at);
        let done = frozen_at.elapsed() >= freeze;
        async move { (done && n >= 20).then_some(()) }
    })
    .await;
    stack.etcd.thaw().expect("thaw etcd");
    let thawed_at = Instant::now();
    let answered_in_freeze = steady.answers_after(frozen_at) - steady.answers_after(thawed_at);
    stack.wait_default(2, thawed_at).await;
    stack.wait_on_workers(2, 2).await;
    let s = steady.stop().await;
    println!(
        "steady clients: {} requests, {} failed, {answered_in_freeze} answered during the freeze",
        s.ok + s.failures.len(),
        s.failures.len()
    );
    assert!(s.failures.is_empty(), "failed requests: {:?}", s.failures);
    let v2_in_freeze = s
        .answers
        .iter()
        .filter(|(at, v)| *at > frozen_at && *at < thawed_at && *v == 2)
        .count();
    assert!(
        v2_in_freeze > 0,
        "the router never reached v2 while etcd was frozen"
    );
}
