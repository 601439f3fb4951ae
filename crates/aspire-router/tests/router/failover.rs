//! Workers that go away: retries, marking down, coming back.

use std::time::Duration;

use tonic::Code;
use tonic_health::ServingStatus;

use aspire_registry::Registry;

use crate::common::*;
use crate::fake_worker::{FakeWorker, Mode};

/// Sends requests until both workers have answered one, so the router holds a
/// connection to each.
async fn warm_up(cluster: &Cluster, a: &FakeWorker, b: &FakeWorker) {
    let client = cluster.client();
    eventually("both workers get traffic", || {
        let mut client = client.clone();
        async move {
            predict(&mut client, "m", None)
                .await
                .map_err(|e| format!("{e:?}"))?;
            if a.state.calls() > 0 && b.state.calls() > 0 {
                Ok(())
            } else {
                Err(format!("a {} b {}", a.state.calls(), b.state.calls()))
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_dead_worker_costs_no_request_and_stays_skipped_until_it_re_registers() {
    let cluster = Cluster::start().await;
    let (mut a, b) = (FakeWorker::start("a").await, FakeWorker::start("b").await);
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    cluster.register(&b, &[(1, Available)]).await;
    warm_up(&cluster, &a, &b).await;

    // "a" dies but its registration stays (its lease has not run out yet).
    a.stop().await;
    let mut client = cluster.client();
    let before = b.state.calls();
    for i in 0..30 {
        let answer = predict(&mut client, "m", None).await;
        assert_eq!(answer.unwrap(), ("b".into(), 1), "request {i}");
    }
    assert_eq!(b.state.calls(), before + 30);

    // "a" comes back at the same address with the same record: nothing told the router,
    // and its probe waits a minute, so it stays skipped.
    let a2 = FakeWorker::start_on("a", a.addr).await;
    for _ in 0..20 {
        assert_eq!(predict(&mut client, "m", None).await.unwrap().0, "b");
    }
    assert_eq!(a2.state.calls(), 0, "a worker marked down got traffic");

    // Its registration ends (lease gone) and a new one begins: it is live again.
    cluster.registry.remove_worker("a").await.unwrap();
    cluster.sync().await;
    cluster.register(&a2, &[(1, Available)]).await;
    eventually("the re-registered worker gets traffic", || {
        let mut client = client.clone();
        let a2 = &a2;
        async move {
            predict(&mut client, "m", None)
                .await
                .map_err(|e| format!("{e:?}"))?;
            (a2.state.calls() > 0)
                .then_some(())
                .ok_or("not yet".to_string())
        }
    })
    .await;
}

#[tokio::test]
async fn a_removed_worker_is_kept_while_it_answers_and_dropped_when_it_reports_not_serving() {
    let cluster = Cluster::start().await;
    let a = FakeWorker::start("a").await;
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 1).await;
    // Its record vanishes (a lease lost to an etcd stall) but it still answers SERVING:
    // it keeps getting traffic, by its last record.
    cluster.registry.remove_worker("a").await.unwrap();
    cluster.sync().await;
    for i in 0..20 {
        let answer = predict(&mut client, "m", None).await;
        assert_eq!(answer.unwrap(), ("a".into(), 1), "request {i}");
    }
    // It starts draining: NOT_SERVING. The next probe (within about a second) drops it.
    a.set_health(ServingStatus::NotServing).await;
    let err = eventually("the drained worker is dropped", || {
        let mut client = client.clone();
        async move {
            match predict(&mut client, "m", None).await {
                Err(e) => Ok(e),
                Ok(answer) => Err(format!("still routed: {answer:?}")),
            }
        }
    })
    .await;
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message()
            .contains("no worker has model 'm' AVAILABLE yet"),
        "{err:?}"
    );
    let calls = a.state.calls();
    assert!(predict(&mut client, "m", None).await.is_err());
    assert_eq!(a.state.calls(), calls, "a dropped worker got traffic");
    // Its health coming back does not bring back a dropped worker; registering does.
    a.set_health(ServingStatus::Serving).await;
    cluster.register(&a, &[(1, Available)]).await;
    eventually_default_version(&mut client, "m", 1).await;
}

#[tokio::test]
async fn a_removed_worker_that_stopped_is_dropped_at_once() {
    let cluster = Cluster::start().await;
    let (mut a, b) = (FakeWorker::start("a").await, FakeWorker::start("b").await);
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    cluster.register(&b, &[(1, Available)]).await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 1).await;
    a.stop().await;
    cluster.registry.remove_worker("a").await.unwrap();
    cluster.sync().await;
    // Whether a request lands on "a" before its probe fails or not, none fails.
    for i in 0..30 {
        let answer = predict(&mut client, "m", None).await;
        assert_eq!(answer.unwrap(), ("b".into(), 1), "request {i}");
    }
}

#[tokio::test]
async fn unavailable_is_retried_on_the_same_version_and_the_worker_skipped() {
    let cluster = Cluster::start().await;
    let (a, b) = (FakeWorker::start("a").await, FakeWorker::start("b").await);
    cluster.model("m", &[1, 2], &[2]).await;
    cluster
        .register(&a, &[(1, Available), (2, Available)])
        .await;
    cluster.register(&b, &[(2, Available)]).await;
    warm_up(&cluster, &a, &b).await;

    // "a" drains: it answers UNAVAILABLE and reports NOT_SERVING.
    a.set_health(ServingStatus::NotServing).await;
    a.state.set_mode(Mode::Fail(Code::Unavailable));
    let mut client = cluster.client();
    let before = a.state.calls();
    for i in 0..30 {
        let answer = predict(&mut client, "m", None).await;
        // Retried on a worker with the same version, never on another version.
        assert_eq!(answer.unwrap(), ("b".into(), 2), "request {i}");
    }
    assert!(
        a.state.calls() - before <= 1,
        "a got {} calls",
        a.state.calls() - before
    );

    // Only "a" has version 1: with "a" down that is UNAVAILABLE, not another version.
    let err = predict(&mut client, "m", Some(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("failed just now (a)"), "{err:?}");
}

#[tokio::test]
async fn a_down_worker_comes_back_when_its_health_check_answers() {
    let cluster = Cluster::with_probe(Duration::from_millis(50)).await;
    let (a, b) = (FakeWorker::start("a").await, FakeWorker::start("b").await);
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    cluster.register(&b, &[(1, Available)]).await;
    warm_up(&cluster, &a, &b).await;

    a.set_health(ServingStatus::NotServing).await;
    a.state.set_mode(Mode::Fail(Code::Unavailable));
    let client = cluster.client();
    let failed = eventually("a is tried and fails", || {
        let mut client = client.clone();
        let a = &a;
        async move {
            let before = a.state.calls();
            predict(&mut client, "m", None)
                .await
                .map_err(|e| format!("{e:?}"))?;
            (a.state.calls() > before)
                .then_some(a.state.calls())
                .ok_or("b answered".to_string())
        }
    })
    .await;
    // Its record never changes; only the probe can bring it back.
    a.state.set_mode(Mode::Normal);
    a.set_health(ServingStatus::Serving).await;
    eventually("a answers again", || {
        let mut client = client.clone();
        let a = &a;
        async move {
            let (worker, _) = predict(&mut client, "m", None)
                .await
                .map_err(|e| format!("{e:?}"))?;
            (worker == "a" && a.state.calls() > failed)
                .then_some(())
                .ok_or(worker)
        }
    })
    .await;
}

#[tokio::test]
async fn other_errors_go_back_as_they_came_without_retry() {
    let cluster = Cluster::start().await;
    let (a, b) = (FakeWorker::start("a").await, FakeWorker::start("b").await);
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    cluster.register(&b, &[(1, Available)]).await;
    warm_up(&cluster, &a, &b).await;
    // RESOURCE_EXHAUSTED is the one code a worker answers that is retried (see below).
    for code in [
        Code::InvalidArgument,
        Code::NotFound,
        Code::DeadlineExceeded,
        Code::Internal,
        Code::Unknown,
    ] {
        a.state.set_mode(Mode::Fail(code));
        b.state.set_mode(Mode::Fail(code));
        let mut client = cluster.client();
        let calls = a.state.calls() + b.state.calls();
        let err = predict(&mut client, "m", None).await.unwrap_err();
        assert_eq!(err.code(), code);
        assert!(err.message().ends_with("fails on purpose"), "{err:?}");
        assert_eq!(
            a.state.calls() + b.state.calls(),
            calls + 1,
            "{code:?} was retried"
        );
    }
    // Neither was marked down: both still get traffic.
    a.state.set_mode(Mode::Normal);
    b.state.set_mode(Mode::Normal);
    let (ca, cb) = (a.state.calls(), b.state.calls());
    let mut client = cluster.client();
    for _ in 0..40 {
        predict(&mut client, "m", None).await.unwrap();
    }
    assert!(a.state.calls() > ca && b.state.calls() > cb);
}

/// A "worker" that accepts connections, reads what comes, and closes them without an
/// answer: a process that crashed mid-call.
async fn crashing_worker() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buf)).await;
                drop(socket);
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_worker_that_drops_the_connection_mid_call_costs_no_request() {
    let cluster = Cluster::start().await;
    let b = FakeWorker::start("b").await;
    let (crashing, accepted) = crashing_worker().await;
    cluster.model("m", &[1], &[1]).await;
    let rec = record(&crashing.to_string(), "m", &[(1, Available)]);
    cluster.registry.put_worker("crashing", &rec).await.unwrap();
    cluster.register(&b, &[(1, Available)]).await;
    cluster.sync().await;
    let mut client = cluster.client();
    for i in 0..20 {
        let answer = predict(&mut client, "m", None).await;
        assert_eq!(answer.unwrap(), ("b".into(), 1), "request {i}");
    }
    let tried = accepted.load(std::sync::atomic::Ordering::SeqCst);
    // Tried once (it is picked half the time), then skipped.
    assert_eq!(tried, 1, "the crashing worker was tried {tried} times");
}

#[tokio::test]
async fn a_shed_request_is_retried_once_on_another_worker_with_the_version() {
    let cluster = Cluster::start().await;
    let (a, b) = (FakeWorker::start("a").await, FakeWorker::start("b").await);
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    cluster.register(&b, &[(1, Available)]).await;
    warm_up(&cluster, &a, &b).await;
    let mut client = cluster.client();
    // One busy worker: every request is answered, by the other one when it lands on `a`.
    a.state.set_mode(Mode::Fail(Code::ResourceExhausted));
    let (ca, cb) = (a.state.calls(), b.state.calls());
    for i in 0..20 {
        let (worker, _) = predict(&mut client, "m", None).await.unwrap();
        assert_eq!(worker, "b", "request {i}");
    }
    let shed = a.state.calls() - ca;
    assert!(shed > 0, "a was never picked");
    assert_eq!(b.state.calls() - cb, 20);
    // `a` was not marked down for it: once it has room it gets traffic again.
    a.state.set_mode(Mode::Normal);
    warm_up(&cluster, &a, &b).await;
    // Both busy: tried twice, never more, and the client gets the worker's own status.
    a.state.set_mode(Mode::Fail(Code::ResourceExhausted));
    b.state.set_mode(Mode::Fail(Code::ResourceExhausted));
    let calls = a.state.calls() + b.state.calls();
    let err = predict(&mut client, "m", None).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().ends_with("fails on purpose"), "{err:?}");
    assert_eq!(a.state.calls() + b.state.calls(), calls + 2);
}

#[tokio::test]
async fn a_shed_request_is_not_retried_on_another_version() {
    let cluster = Cluster::start().await;
    let (a, b) = (FakeWorker::start("a").await, FakeWorker::start("b").await);
    cluster.model("m", &[1, 2], &[1, 2]).await;
    cluster.register(&a, &[(2, Available)]).await;
    cluster.register(&b, &[(1, Available)]).await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 2).await;
    a.state.set_mode(Mode::Fail(Code::ResourceExhausted));
    let cb = b.state.calls();
    let err = predict(&mut client, "m", None).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        b.state.calls(),
        cb,
        "b has another version; it must not be asked"
    );
}
