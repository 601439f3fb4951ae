//! The router's view of the registry lagging behind the workers: a worker answers that it
//! is unloading the version it was sent, and the router picks again without marking it
//! down nor showing the answer to the client; and the per-call timeout for requests
//! without a deadline.

use std::time::Duration;

use aspire_proto::serving::PredictRequest;
use aspire_telemetry::metrics::{sample, scrape};
use tonic::Code;

use crate::common::*;
use crate::fake_worker::{FakeWorker, Mode};

/// No `x-aspire-*` key in `metadata`.
fn assert_no_own_keys(metadata: &tonic::metadata::MetadataMap, what: &str) {
    for key in metadata.keys() {
        let name = match key {
            tonic::metadata::KeyRef::Ascii(k) => k.as_str().to_string(),
            tonic::metadata::KeyRef::Binary(k) => k.as_str().to_string(),
        };
        assert!(!name.starts_with("x-aspire-"), "{what} carries {name}");
    }
}

#[tokio::test]
async fn a_default_request_goes_again_to_the_same_worker_at_its_default_version() {
    let cluster = Cluster::with_metrics().await;
    let a = FakeWorker::start("a").await;
    // The router still thinks version 1 is the one to serve; "a" has moved on to 2.
    cluster.model("m", &[1, 2], &[1]).await;
    cluster
        .register(&a, &[(1, Available), (2, Available)])
        .await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 1).await;
    a.state.set_mode(Mode::Unloading {
        version: 1,
        default: Some(2),
    });
    let before = a.state.calls();
    for i in 0..5 {
        let request = PredictRequest {
            model_spec: Some(spec("m", None)),
            ..Default::default()
        };
        let response = client.predict(request).await.unwrap();
        assert_no_own_keys(response.metadata(), "an answer");
        let out = response.into_inner().outputs;
        assert_eq!(out["worker"].string_val[0], b"a", "request {i}");
        assert_eq!(out["version"].int64_val[0], 2, "request {i}");
    }
    // Two calls per request, the same worker both times, never marked down.
    assert_eq!(a.state.calls(), before + 10);
    let text = scrape(cluster.metrics_addr.unwrap()).await.unwrap();
    assert_eq!(sample(&text, "aspire_router_repicks_total", &[]), Some(5.0));
    assert_eq!(
        sample(&text, "aspire_router_workers_marked_down_total", &[]),
        Some(0.0)
    );
    assert_eq!(sample(&text, "aspire_router_live_workers", &[]), Some(1.0));
    // Counted under the version that answered.
    let route = [("model", "m"), ("version", "2"), ("code", "OK")];
    assert_eq!(
        sample(&text, "aspire_router_requests_total", &route),
        Some(5.0)
    );
    // Every call carried the forwarded header.
    for r in a.state.received.lock().unwrap().iter() {
        assert_eq!(r.metadata.get("x-aspire-forwarded").unwrap(), "1");
    }
}

#[tokio::test]
async fn without_a_default_in_the_answer_the_request_is_routed_again_elsewhere() {
    let (cluster, a, _b) = Cluster::two_workers_serving_m_v1().await;
    let mut client = cluster.client();
    // "a" is unloading everything (a drain) and has no default to offer.
    a.state.set_mode(Mode::Unloading {
        version: 1,
        default: None,
    });
    for i in 0..30 {
        let answer = predict(&mut client, "m", None).await;
        assert_eq!(answer.unwrap(), ("b".into(), 1), "request {i}");
    }
    assert!(a.state.calls() > 0, "no request went to a");
}

#[tokio::test]
async fn a_named_version_goes_to_another_worker_that_has_it_else_not_found() {
    let cluster = Cluster::start().await;
    let (a, b) = (FakeWorker::start("a").await, FakeWorker::start("b").await);
    cluster.model("m", &[1, 2], &[2]).await;
    cluster
        .register(&a, &[(1, Available), (2, Available)])
        .await;
    cluster
        .register(&b, &[(1, Available), (2, Available)])
        .await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 2).await;
    a.state.set_mode(Mode::Unloading {
        version: 1,
        default: Some(2),
    });
    for i in 0..30 {
        let answer = predict(&mut client, "m", Some(1)).await;
        // Never the default version: the client named 1.
        assert_eq!(answer.unwrap(), ("b".into(), 1), "request {i}");
    }
    // Both unload it: NOT_FOUND naming the version, with no trailer of the router's.
    b.state.set_mode(Mode::Unloading {
        version: 1,
        default: Some(2),
    });
    let err = predict(&mut client, "m", Some(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("version 1 is being unloaded"),
        "{err:?}"
    );
    assert_no_own_keys(err.metadata(), "a NOT_FOUND");
    // Version 2 is still served by both.
    assert_eq!(predict(&mut client, "m", Some(2)).await.unwrap().1, 2);
}

#[tokio::test]
async fn re_picks_are_bounded_and_their_answer_is_clean() {
    let (cluster, a, b) = Cluster::two_workers_serving_m_v1().await;
    let mut client = cluster.client();
    // Both are unloading the version with nothing to offer instead: the router would
    // bounce between them.
    for w in [&a, &b] {
        w.state.set_mode(Mode::Unloading {
            version: 1,
            default: None,
        });
    }
    let before = a.state.calls() + b.state.calls();
    let err = predict(&mut client, "m", None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains("each of 3 tries met a worker unloading"),
        "{err:?}"
    );
    assert_no_own_keys(err.metadata(), "the answer after the re-picks");
    let calls = a.state.calls() + b.state.calls() - before;
    // The first call and two re-picks, each on the other worker.
    assert_eq!(calls, 3);
    // Neither was marked down: back to normal, both serve at once.
    a.state.set_mode(Mode::Normal);
    b.state.set_mode(Mode::Normal);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(predict(&mut client, "m", None).await.unwrap().0);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test]
async fn a_request_without_a_deadline_is_held_to_the_request_timeout() {
    let cluster = Cluster::start_with_args(
        Duration::from_secs(60),
        false,
        &["--request-timeout-ms=300"],
    )
    .await;
    let a = FakeWorker::start("a").await;
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 1).await;
    a.state.set_mode(Mode::Hang);
    let started = std::time::Instant::now();
    let err = predict(&mut client, "m", None).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("--request-timeout-ms"), "{err:?}");
    assert!(err.message().contains("300 ms"), "{err:?}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The worker's call was dropped with it.
    eventually("the hanging call is cancelled", || async {
        (a.state.cancelled.load(std::sync::atomic::Ordering::SeqCst) > 0)
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    // A client's own deadline, longer than the flag, is used as it is.
    a.state.set_mode(Mode::Delay(Duration::from_millis(600)));
    let mut request = tonic::Request::new(PredictRequest {
        model_spec: Some(spec("m", None)),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(20));
    let answer = client.predict(request).await.unwrap().into_inner();
    assert_eq!(answer.outputs["version"].int64_val[0], 1);
}

#[tokio::test]
async fn a_request_timeout_of_zero_is_no_limit() {
    let cluster =
        Cluster::start_with_args(Duration::from_secs(60), false, &["--request-timeout-ms=0"]).await;
    let a = FakeWorker::start("a").await;
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 1).await;
    a.state.set_mode(Mode::Delay(Duration::from_millis(400)));
    assert_eq!(predict(&mut client, "m", None).await.unwrap().1, 1);
}
