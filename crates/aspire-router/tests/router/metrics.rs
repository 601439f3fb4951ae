//! The router's `/metrics`, scraped over HTTP after real traffic: requests by the route
//! taken and the code the client got, retries, workers marked down, live workers.

use aspire_telemetry::metrics::{sample, scrape};
use tonic::Code;

use crate::common::*;
use crate::fake_worker::{FakeWorker, Mode};

#[tokio::test]
async fn metrics_count_routes_codes_retries_and_live_workers() {
    let cluster = Cluster::with_metrics().await;
    let metrics = cluster.metrics_addr.unwrap();
    let (a, b) = (FakeWorker::start("a").await, FakeWorker::start("b").await);
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    cluster.register(&b, &[(1, Available)]).await;
    cluster.sync().await;
    let text = scrape(metrics).await.unwrap();
    assert_eq!(sample(&text, "aspire_router_live_workers", &[]), Some(2.0));

    // "a" goes away: the request that lands on it is retried on "b", and from then on
    // "a" is skipped.
    a.state.set_mode(Mode::Fail(Code::Unavailable));
    let mut client = cluster.client();
    let mut ok = 0;
    while a.state.calls() == 0 {
        assert!(ok < 200, "no request went to a in {ok}");
        let (worker, _) = predict(&mut client, "m", Some(1)).await.unwrap();
        assert_eq!(worker, "b");
        ok += 1;
    }
    for _ in 0..3 {
        predict(&mut client, "m", Some(1)).await.unwrap();
        ok += 1;
    }
    assert_eq!(a.state.calls(), 1);
    // A request the worker refuses, and one the router refuses before routing it.
    b.state.set_mode(Mode::Fail(Code::InvalidArgument));
    let refused = predict(&mut client, "m", Some(1)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let malformed = predict(&mut client, "m", Some(-1)).await.unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    // A client that gives up on a hanging worker: counted as cancelled once the router
    // sees the stream reset.
    b.state.set_mode(Mode::Hang);
    let gave_up = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        predict(&mut client, "m", Some(1)),
    )
    .await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    eventually("the cancelled request counted", || async {
        let text = scrape(metrics).await.unwrap();
        let cancelled = [("model", "m"), ("version", "1"), ("code", "Canceled")];
        match sample(&text, "aspire_router_requests_total", &cancelled) {
            Some(1.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    let text = scrape(metrics).await.unwrap();
    let get = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);
    let requests = |model, version, code| [("model", model), ("version", version), ("code", code)];
    assert_eq!(
        get("aspire_router_requests_total", &requests("m", "1", "OK")),
        Some(f64::from(ok))
    );
    assert_eq!(
        get(
            "aspire_router_requests_total",
            &requests("m", "1", "InvalidArgument")
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            "aspire_router_requests_total",
            &requests("", "", "InvalidArgument")
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            "aspire_router_request_duration_seconds_count",
            &[("model", "m"), ("version", "1")]
        ),
        Some(f64::from(ok + 2))
    );
    assert_eq!(get("aspire_router_retries_total", &[]), Some(1.0));
    assert_eq!(
        get("aspire_router_workers_marked_down_total", &[]),
        Some(1.0)
    );
    assert_eq!(get("aspire_router_live_workers", &[]), Some(1.0));
}
