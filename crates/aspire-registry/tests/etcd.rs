//! The etcd registry against a real etcd (one throwaway server per test): the conformance
//! suite, prefixes, worker leases (expiry, revoke, loss) and etcd outages.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aspire_core::keys::KeySchema;
use aspire_core::{AvailableVersions, ModelName, WorkerRecord};
use aspire_registry::conformance::{self, wait_for};
use aspire_registry::etcd_server::EtcdServer;
use aspire_registry::{EtcdOptions, EtcdRegistry, Registry, RegistryError};

fn etcd() -> EtcdServer {
    EtcdServer::start().unwrap_or_else(|e| panic!("{e}"))
}

async fn registry(server: &EtcdServer, prefix: &str, options: EtcdOptions) -> EtcdRegistry {
    EtcdRegistry::connect(&[server.endpoint()], KeySchema::new(prefix), options)
        .await
        .expect("connect to the test etcd")
}

fn ttl(secs: u64) -> EtcdOptions {
    EtcdOptions {
        lease_ttl: Duration::from_secs(secs),
        op_timeout: Duration::from_secs(1),
        ..EtcdOptions::default()
    }
}

fn worker(address: &str) -> WorkerRecord {
    WorkerRecord {
        address: address.into(),
        device: "cpu".into(),
        ..Default::default()
    }
}

fn model(name: &str) -> ModelName {
    ModelName::new(name).expect("valid model name")
}

/// Polls `check` until it returns true; panics after 10 s.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn passes_the_conformance_suite() {
    let server = etcd();
    let endpoint = server.endpoint();
    conformance::run_all(|prefix| {
        let endpoints = vec![endpoint.clone()];
        async move {
            let r = EtcdRegistry::connect(&endpoints, KeySchema::new(&prefix), ttl(10))
                .await
                .expect("connect");
            Arc::new(r) as Arc<dyn Registry>
        }
    })
    .await;
}

#[tokio::test]
async fn registries_on_different_prefixes_do_not_see_each_other() {
    let server = etcd();
    // "/iso" is a string prefix of "/iso2": only the '/'-terminated root keeps them apart.
    let a = registry(&server, "/iso", ttl(10)).await;
    let b = registry(&server, "/iso2", ttl(10)).await;
    a.put_worker("wa", &worker("10.0.0.1:1"))
        .await
        .expect("put");
    a.put_available(&model("only_a"), &AvailableVersions::default())
        .await
        .expect("put");
    b.put_worker("wb", &worker("10.0.0.2:1"))
        .await
        .expect("put");

    let sa = wait_for(&a, "a's worker", |s| s.workers.contains_key("wa")).await;
    let sb = wait_for(&b, "b's worker", |s| s.workers.contains_key("wb")).await;
    assert_eq!(sa.workers.keys().collect::<Vec<_>>(), ["wa"]);
    assert_eq!(sb.workers.keys().collect::<Vec<_>>(), ["wb"]);
    assert!(sb.models.is_empty(), "{:?}", sb.models);
    assert!(sa.problems.is_empty() && sb.problems.is_empty());
    let fresh_b = b.state().await.expect("state");
    assert_eq!(fresh_b.workers.keys().collect::<Vec<_>>(), ["wb"]);
    assert!(fresh_b.models.is_empty());
}

#[tokio::test]
async fn registries_on_one_prefix_see_each_others_writes() {
    let server = etcd();
    let discovery = registry(&server, "/shared", ttl(10)).await;
    let worker_side = registry(&server, "/shared", ttl(10)).await;
    let m = model("mnist");
    discovery
        .put_available(&m, &AvailableVersions::default())
        .await
        .expect("put");
    worker_side
        .put_worker("w1", &worker("10.0.0.1:9000"))
        .await
        .expect("put");
    for r in [&discovery, &worker_side] {
        let s = wait_for(r, "the model and the worker", |s| {
            s.models.contains_key(&m) && s.workers.contains_key("w1")
        })
        .await;
        assert_eq!(s.workers["w1"].address, "10.0.0.1:9000");
    }
}

#[tokio::test]
async fn a_dropped_registrys_workers_vanish_when_their_lease_expires() {
    let server = etcd();
    let observer = registry(&server, "/drop", ttl(10)).await;
    let crashed = registry(&server, "/drop", ttl(2)).await;
    crashed
        .put_worker("w1", &worker("10.0.0.1:1"))
        .await
        .expect("put");
    wait_for(&observer, "w1 registered", |s| s.workers.contains_key("w1")).await;

    drop(crashed);
    // Dropping deletes nothing (as a crash would not): the record is still there...
    let right_after = observer.state().await.expect("state");
    assert!(right_after.workers.contains_key("w1"));
    // ...until etcd expires the lease that is no longer kept alive.
    wait_for(&observer, "w1 expired", |s| !s.workers.contains_key("w1")).await;
}

#[tokio::test]
async fn close_revokes_the_lease_at_once() {
    let server = etcd();
    let observer = registry(&server, "/close", ttl(10)).await;
    // A lease far longer than wait_for's limit: only a revoke can remove the records in time.
    let leaving = registry(&server, "/close", ttl(120)).await;
    let m = model("kept");
    leaving
        .put_available(&m, &AvailableVersions::default())
        .await
        .expect("put");
    for id in ["w1", "w2"] {
        leaving
            .put_worker(id, &worker("10.0.0.1:1"))
            .await
            .expect("put");
    }
    wait_for(&observer, "two workers", |s| s.workers.len() == 2).await;

    leaving.close().await.expect("close");
    let s = wait_for(&observer, "workers gone", |s| s.workers.is_empty()).await;
    assert!(s.models.contains_key(&m), "only worker records are leased");
    let err = leaving.put_worker("w3", &worker("10.0.0.1:1")).await;
    assert!(matches!(err, Err(RegistryError::Unavailable(_))), "{err:?}");
}

#[tokio::test]
async fn a_worker_re_registers_when_its_lease_is_lost() {
    let server = etcd();
    let r = registry(&server, "/lost", ttl(2)).await;
    r.put_worker("w1", &worker("10.0.0.1:1"))
        .await
        .expect("put");
    let key = r.schema().worker_key("w1");
    let mut raw = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .expect("raw client");
    let old_lease = raw.get(key.as_str(), None).await.expect("get").kvs()[0].lease();
    assert_ne!(old_lease, 0, "worker records live under a lease");

    // As if the lease expired during an outage: etcd deletes the record with it.
    raw.lease_revoke(old_lease).await.expect("revoke");
    eventually("w1 put again under a new lease", || {
        let mut raw = raw.clone();
        let key = key.clone();
        async move {
            let resp = raw.get(key, None).await.expect("get");
            resp.kvs()
                .first()
                .is_some_and(|kv| kv.lease() != 0 && kv.lease() != old_lease)
        }
    })
    .await;
    let s = wait_for(&r, "w1 back in the watched state", |s| {
        s.workers.contains_key("w1")
    })
    .await;
    assert_eq!(s.workers["w1"].address, "10.0.0.1:1");
}

#[tokio::test]
async fn subscribers_keep_their_state_through_an_etcd_restart_and_resume() {
    let mut server = etcd();
    let writer = registry(&server, "/restart", ttl(2)).await;
    let watcher = registry(&server, "/restart", ttl(2)).await;
    writer
        .put_worker("w1", &worker("10.0.0.1:1"))
        .await
        .expect("put");
    writer
        .put_available(&model("before"), &AvailableVersions::default())
        .await
        .expect("put");
    let before = wait_for(&watcher, "w1 and the model", |s| {
        s.workers.contains_key("w1") && s.models.contains_key(&model("before"))
    })
    .await;

    server.stop();
    let rx = watcher.subscribe();
    // Long enough for the broken watch to retry listing several times.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        watcher.state().await.is_err(),
        "etcd is down, so a fresh read fails"
    );
    assert_eq!(
        **rx.borrow(),
        *before,
        "an outage must not change the state"
    );

    server.restart().expect("restart etcd");
    let after = model("after");
    // etcd is healthy when restart() returns, so the client's reconnect is due at once.
    writer
        .put_available(&after, &AvailableVersions::default())
        .await
        .expect("a write right after the restart");
    let s = wait_for(&watcher, "the write made after the restart", |s| {
        s.models.contains_key(&after)
    })
    .await;
    assert!(s.workers.contains_key("w1"), "{s:#?}");
    // Past the 2 s TTL: the lease is still kept alive (or was replaced) after the outage.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fresh = watcher.state().await.expect("state");
    assert!(fresh.workers.contains_key("w1"), "{fresh:#?}");
    assert!(watcher.subscribe().borrow().workers.contains_key("w1"));
}

#[tokio::test]
async fn calls_fail_within_the_op_timeout_while_etcd_is_stopped() {
    let mut server = etcd();
    let r = registry(&server, "/down", ttl(2)).await;
    server.stop();

    let started = Instant::now();
    let err = r
        .put_available(&model("m"), &AvailableVersions::default())
        .await;
    let took = started.elapsed();
    match err {
        Err(RegistryError::Unavailable(why)) => {
            assert!(why.contains(&server.endpoint()), "{why}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // op_timeout is 1 s; the slack covers a loaded test machine.
    assert!(took < Duration::from_millis(1800), "took {took:?}");
    let started = Instant::now();
    let err = r.put_worker("w1", &worker("10.0.0.1:1")).await;
    assert!(matches!(err, Err(RegistryError::Unavailable(_))), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(1800));

    // The registration that failed while etcd was away is retried when it returns.
    server.restart().expect("restart etcd");
    wait_for(&r, "w1 registered after etcd came back", |s| {
        s.workers.contains_key("w1")
    })
    .await;
}

#[tokio::test]
async fn connecting_to_a_dead_endpoint_fails_fast_naming_it() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let err = EtcdRegistry::connect(
        std::slice::from_ref(&endpoint),
        KeySchema::default(),
        ttl(2),
    )
    .await
    .expect_err("nothing listens there");
    assert!(started.elapsed() < Duration::from_millis(1800));
    let RegistryError::Unavailable(why) = err else {
        panic!("expected Unavailable, got {err:?}")
    };
    assert!(why.contains(&endpoint), "{why}");
}

#[tokio::test]
async fn typo_keys_and_bad_values_show_up_in_problems() {
    let server = etcd();
    let writer = registry(&server, "/typos", ttl(10)).await;
    let reader = registry(&server, "/typos", ttl(10)).await;
    let typo = "/typos/modles/mnist/aspired";
    let bad_worker = "/typos/workers/w1";
    let bad_bytes = "/typos/models/mnist/pinned";
    writer.put_raw(typo, Some(b"{}")).await.expect("put");
    writer
        .put_raw(bad_worker, Some(b"{\"address\": 7}"))
        .await
        .expect("put");
    writer
        .put_raw(bad_bytes, Some(&[0xff, 0xfe, 0x00]))
        .await
        .expect("put");
    writer
        .put_raw("/elsewhere/models/mnist/pinned", Some(b"1"))
        .await
        .expect("put");
    let s = wait_for(&reader, "three problems", |s| s.problems.len() == 3).await;
    assert!(s.problems.contains_key(typo), "{:?}", s.problems);
    assert!(s.problems.contains_key(bad_worker), "{:?}", s.problems);
    assert!(s.problems.contains_key(bad_bytes), "{:?}", s.problems);
    assert!(s.workers.is_empty());
    assert_eq!(reader.state().await.expect("state").problems, s.problems);
}
