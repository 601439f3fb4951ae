//! The etcd registry through etcd's faults: a member cut off from its quorum (left for a
//! healthy one), a member that stops answering (its silent watch restarted), listings
//! larger than a gRPC message (paged), and a lease that expired while etcd was frozen
//! (the worker is back soon after etcd answers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aspire_core::keys::KeySchema;
use aspire_core::{ModelName, WorkerRecord};
use aspire_registry::etcd_cluster::EtcdCluster;
use aspire_registry::etcd_server::EtcdServer;
use aspire_registry::{EtcdOptions, EtcdRegistry, Registry};

fn model(name: &str) -> ModelName {
    ModelName::new(name).expect("valid model name")
}

fn worker(address: &str) -> WorkerRecord {
    WorkerRecord {
        address: address.into(),
        device: "cpu".into(),
        ..Default::default()
    }
}

/// Polls `check` every 20 ms until it holds; panics naming `what` after `limit`.
async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// The brief's case: two clients whose endpoint list starts with the member about to be
/// cut off; once it is, a pin written through a healthy member reaches both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leave_a_member_cut_off_from_its_quorum() {
    let cluster = EtcdCluster::start().unwrap_or_else(|e| panic!("{e}"));
    let schema = KeySchema::new("/cut");
    // The member to cut first, then the healthy ones.
    let endpoints = cluster.endpoints();
    let a = EtcdRegistry::connect(&endpoints, schema.clone(), EtcdOptions::default())
        .await
        .expect("client a");
    let b = EtcdRegistry::connect(&endpoints, schema.clone(), EtcdOptions::default())
        .await
        .expect("client b");
    assert_eq!(a.current_endpoint(), endpoints[0]);
    assert_eq!(b.current_endpoint(), endpoints[0]);
    let writer = EtcdRegistry::connect(
        &[cluster.endpoint(2)],
        schema.clone(),
        EtcdOptions::default(),
    )
    .await
    .expect("writer on a healthy member");
    let m = model("mnist");
    a.put_worker("wa", &worker("10.0.0.1:1"))
        .await
        .expect("a registers before the cut");

    let cut = Instant::now();
    cluster.isolate(0);
    let leaderless = eventually(
        Duration::from_secs(10),
        "member 0 to lose its leader",
        || !cluster.has_leader(0),
    )
    .await;
    // The writer's member may itself be electing a new leader (member 0 may have led):
    // a write may fail until it has one.
    let written = loop {
        match writer.set_pinned(&m, Some("7")).await {
            Ok(()) => break cut.elapsed(),
            Err(e) => {
                assert!(
                    cut.elapsed() < Duration::from_secs(15),
                    "the healthy members never took the pin: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let (mut ra, mut rb) = (a.subscribe(), b.subscribe());
    let pinned = |rx: &mut tokio::sync::watch::Receiver<Arc<aspire_core::ClusterState>>| -> bool {
        rx.borrow_and_update()
            .models
            .get(&m)
            .and_then(|s| s.pinned.clone())
            .is_some()
    };
    let bound = Duration::from_secs(12);
    eventually(bound, "client a to see the pin", || pinned(&mut ra)).await;
    let seen_a = cut.elapsed();
    eventually(bound, "client b to see the pin", || pinned(&mut rb)).await;
    let seen_b = cut.elapsed();
    println!(
        "member 0 leaderless {} ms after the cut; pin written at {} ms; seen by a at {} ms \
         (now on {}), by b at {} ms (now on {})",
        leaderless.as_millis(),
        written.as_millis(),
        seen_a.as_millis(),
        a.current_endpoint(),
        seen_b.as_millis(),
        b.current_endpoint()
    );
    assert_ne!(a.current_endpoint(), endpoints[0]);
    assert_ne!(b.current_endpoint(), endpoints[0]);
    // Writes work from the clients that moved, and reach the writer.
    b.put_worker("wb", &worker("10.0.0.2:1"))
        .await
        .expect("b registers after moving");
    let mut rw = writer.subscribe();
    eventually(bound, "the writer to see both workers", || {
        let s = rw.borrow_and_update();
        s.workers.contains_key("wa") && s.workers.contains_key("wb")
    })
    .await;
}

/// A member that stops answering (frozen) leaves a watch that brings nothing: the
/// watcher asks for progress, gives up on the stream after the stall bound and, when
/// etcd answers again, watches afresh and sees new writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_watch_is_restarted() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let options = EtcdOptions {
        op_timeout: Duration::from_secs(1),
        progress_interval: Duration::from_millis(200),
        // Well above a progress round trip on a loaded 2-core machine.
        stall_timeout: Duration::from_millis(1500),
        ..EtcdOptions::default()
    };
    let schema = KeySchema::new("/stall");
    let watcher = EtcdRegistry::connect(&[server.endpoint()], schema.clone(), options)
        .await
        .expect("connect");
    let writer = EtcdRegistry::connect(&[server.endpoint()], schema, options)
        .await
        .expect("connect");
    // An idle, healthy watch is not mistaken for a stalled one.
    let idle = Instant::now();
    while idle.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        watcher.watch_streams_opened(),
        1,
        "an idle watch was restarted"
    );

    server.freeze().expect("freeze etcd");
    // Frozen for a few stall bounds: the stream must be given up meanwhile.
    let frozen = Instant::now();
    while frozen.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.thaw().expect("thaw etcd");
    eventually(Duration::from_secs(10), "a new watch stream", || {
        watcher.watch_streams_opened() >= 2
    })
    .await;
    let m = model("after");
    writer.set_pinned(&m, Some("3")).await.expect("write after");
    let mut rx = watcher.subscribe();
    eventually(Duration::from_secs(5), "the write after the freeze", || {
        rx.borrow_and_update().models.contains_key(&m)
    })
    .await;
}

/// 20 MiB under the prefix (twenty 1 MiB values under keys the roles ignore), more than
/// tonic's 4 MiB and than the 16 MiB this client decodes in one response: connecting
/// lists it in pages (the first page of 100 keys is too large and is read again in
/// smaller ones), `state()` too, and after an etcd restart the watcher lists it again and
/// keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_larger_than_a_grpc_message_are_paged() {
    const BLOBS: usize = 20;
    let mut server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let schema = KeySchema::new("/big");
    let options = EtcdOptions {
        op_timeout: Duration::from_secs(5),
        ..EtcdOptions::default()
    };
    let writer = EtcdRegistry::connect(&[server.endpoint()], schema.clone(), options)
        .await
        .expect("connect");
    let blob = vec![b'x'; 1024 * 1024];
    for i in 0..BLOBS {
        writer
            .put_raw(&format!("/big/blobs/b{i}"), Some(&blob))
            .await
            .expect("put a 1 MiB value");
    }
    let m = model("mnist");
    writer.set_pinned(&m, Some("1")).await.expect("pin");
    writer
        .put_worker("w1", &worker("10.0.0.1:1"))
        .await
        .expect("worker");

    let reader = EtcdRegistry::connect(&[server.endpoint()], schema, options)
        .await
        .expect("connecting lists 20 MiB");
    let s = reader.subscribe().borrow().clone();
    assert!(s.models.contains_key(&m) && s.workers.contains_key("w1"));
    // The ignored keys show up as problems, as any unknown key does.
    assert_eq!(s.problems.len(), BLOBS, "{:?}", s.problems.keys());
    let fresh = reader.state().await.expect("state() of 20 MiB");
    assert_eq!(fresh.problems.len(), BLOBS);

    server.restart().expect("restart etcd");
    let m2 = model("later");
    // The writer may need a moment to reconnect.
    let start = Instant::now();
    while writer.set_pinned(&m2, Some("2")).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no write after restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut rx = reader.subscribe();
    eventually(
        Duration::from_secs(10),
        "the write after the restart",
        || rx.borrow_and_update().models.contains_key(&m2),
    )
    .await;
    // The re-list brings the write before the new watch stream is open: wait for it.
    eventually(
        Duration::from_secs(10),
        "the watch opened again after the re-list",
        || reader.watch_streams_opened() >= 2,
    )
    .await;
}

/// A lease that expired while etcd was frozen: the worker is registered again within
/// about the retry interval of etcd answering, not a third of the TTL later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_lease_expired_during_a_freeze_is_back_soon() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let schema = KeySchema::new("/freeze");
    let options = EtcdOptions {
        lease_ttl: Duration::from_secs(9),
        op_timeout: Duration::from_secs(1),
        retry_interval: Duration::from_millis(300),
        ..EtcdOptions::default()
    };
    let registry = EtcdRegistry::connect(&[server.endpoint()], schema.clone(), options)
        .await
        .expect("connect");
    let observer = EtcdRegistry::connect(&[server.endpoint()], schema, options)
        .await
        .expect("connect");
    registry
        .put_worker("w1", &worker("10.0.0.1:1"))
        .await
        .expect("register");
    let mut rx = observer.subscribe();
    eventually(Duration::from_secs(5), "w1 registered", || {
        rx.borrow_and_update().workers.contains_key("w1")
    })
    .await;

    let raw = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .expect("raw client");
    let mut kv = raw.kv_client();
    let lease_of = |resp: etcd_client::GetResponse| resp.kvs().first().map(|kv| kv.lease());
    let first_lease =
        lease_of(kv.get("/freeze/workers/w1", None).await.expect("get")).expect("w1 is in etcd");

    server.freeze().expect("freeze etcd");
    // Longer than the TTL: etcd revokes the lease as soon as it runs again.
    let frozen = Instant::now();
    while frozen.elapsed() < Duration::from_secs(11) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.thaw().expect("thaw etcd");
    let resumed = Instant::now();
    // Back under a new lease; the bound is well under a third of the TTL (3 s).
    let back = loop {
        if let Ok(resp) = kv.get("/freeze/workers/w1", None).await
            && lease_of(resp).is_some_and(|l| l != first_lease)
        {
            break resumed.elapsed();
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(10),
            "w1 never came back under a new lease after the freeze"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "w1 registered again {} ms after etcd resumed",
        back.as_millis()
    );
    assert!(
        back < Duration::from_millis(2500),
        "re-registration took {back:?}, not about the retry interval"
    );
}

/// An endpoint where nothing listens, listed first, is skipped at connect and stays
/// skipped: calls and the watch go to the next one.
#[tokio::test]
async fn a_dead_first_endpoint_is_skipped() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let endpoints = [dead, server.endpoint()];
    let options = EtcdOptions {
        op_timeout: Duration::from_secs(2),
        ..EtcdOptions::default()
    };
    let r = EtcdRegistry::connect(&endpoints, KeySchema::new("/dead"), options)
        .await
        .expect("the live endpoint is found");
    assert_eq!(r.current_endpoint(), server.endpoint());
    r.put_worker("w1", &worker("10.0.0.1:1"))
        .await
        .expect("put via the live endpoint");
    let mut rx = r.subscribe();
    eventually(Duration::from_secs(5), "w1 watched", || {
        rx.borrow_and_update().workers.contains_key("w1")
    })
    .await;
    assert_eq!(r.current_endpoint(), server.endpoint());
}
