//! What the forwarded call carries: the bytes, the deadline, the cancellation; and how
//! calls spread over workers.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use aspire_proto::TensorProto;
use aspire_proto::serving::{PredictRequest, PredictResponse, model_spec::VersionChoice};
use aspire_router::raw_codec::RawCodec;
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use tonic::codegen::http::uri::PathAndQuery;

use crate::common::*;
use crate::fake_worker::{FakeWorker, Mode};

fn inputs() -> HashMap<String, TensorProto> {
    let pixels: Vec<u8> = (0..4096u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    HashMap::from([
        (
            "images".to_string(),
            TensorProto {
                dtype: 1,
                tensor_content: Bytes::from(pixels),
                ..Default::default()
            },
        ),
        (
            "scale".to_string(),
            TensorProto {
                dtype: 1,
                float_val: vec![0.5, -1.25, 3.0e-7],
                ..Default::default()
            },
        ),
    ])
}

#[tokio::test]
async fn inputs_reach_the_worker_byte_identical() {
    let cluster = Cluster::start().await;
    let a = FakeWorker::start("a").await;
    cluster.model("m", &[4], &[4]).await;
    cluster.register(&a, &[(4, Available)]).await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 4).await;

    // The client's bytes: model_spec, then the other fields exactly as encoded here.
    let head = PredictRequest {
        model_spec: Some(spec("m", None)),
        ..Default::default()
    }
    .encode_to_vec();
    let tail = PredictRequest {
        model_spec: None,
        inputs: inputs(),
        output_filter: vec!["worker".into()],
    }
    .encode_to_vec();
    let sent = Bytes::from([head, tail.clone()].concat());
    let mut raw = tonic::client::Grpc::new(cluster.channel());
    raw.ready().await.unwrap();
    let answer = raw
        .unary(
            tonic::Request::new(sent),
            PathAndQuery::from_static("/tensorflow.serving.PredictionService/Predict"),
            RawCodec::<Bytes>::new(),
        )
        .await
        .unwrap()
        .into_inner();

    let received = a.state.last().body;
    assert!(
        received.ends_with(&tail),
        "the other fields changed on the way"
    );
    let got = PredictRequest::decode(received.clone()).unwrap();
    assert_eq!(got.inputs, inputs());
    assert_eq!(
        got.model_spec.unwrap().version_choice,
        Some(VersionChoice::Version(4))
    );
    let spec_len = received.len() - tail.len();
    assert_eq!(spec_len, spec("m", Some(4)).encoded_len() + 2);
    // The worker's answer comes back as it was sent.
    let response = PredictResponse::decode(answer).unwrap();
    assert_eq!(response.outputs["version"].int64_val, vec![4]);
}

#[tokio::test]
async fn large_messages_pass_both_hops() {
    let cluster = Cluster::start().await;
    let a = FakeWorker::start("a").await;
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 1).await;
    // Above tonic's default 4 MiB decoding limit.
    let big = TensorProto {
        dtype: 1,
        tensor_content: Bytes::from(vec![7u8; 6 << 20]),
        ..Default::default()
    };
    let request = PredictRequest {
        model_spec: Some(spec("m", None)),
        inputs: HashMap::from([("images".to_string(), big.clone())]),
        output_filter: vec![],
    };
    client.predict(request).await.unwrap();
    let got = PredictRequest::decode(a.state.last().body).unwrap();
    assert_eq!(got.inputs["images"], big);
}

fn parse_timeout(raw: &str) -> Duration {
    let (n, unit) = raw.split_at(raw.len() - 1);
    let n: u64 = n.parse().unwrap();
    match unit {
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        other => panic!("unit {other}"),
    }
}

#[tokio::test]
async fn the_client_deadline_reaches_the_worker() {
    let cluster = Cluster::start().await;
    let a = FakeWorker::start("a").await;
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 1).await;
    assert_eq!(
        a.state.last().timeout,
        None,
        "no deadline was set, none should arrive"
    );

    let mut request = tonic::Request::new(PredictRequest {
        model_spec: Some(spec("m", None)),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(5));
    client.predict(request).await.unwrap();
    let raw = a
        .state
        .last()
        .timeout
        .expect("no grpc-timeout reached the worker");
    let left = parse_timeout(&raw);
    assert!(
        left <= Duration::from_secs(5) && left > Duration::from_secs(3),
        "{raw}"
    );

    // A worker slower than the deadline: the client gets DEADLINE_EXCEEDED or
    // CANCELLED (tonic's server answers an expired deadline with the latter), in time.
    a.state.set_mode(Mode::Delay(Duration::from_secs(30)));
    let mut request = tonic::Request::new(PredictRequest {
        model_spec: Some(spec("m", None)),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let err = client.predict(request).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "{err:?}");
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn client_cancellation_reaches_the_worker() {
    let cluster = Cluster::start().await;
    let a = FakeWorker::start("a").await;
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 1).await;

    a.state.set_mode(Mode::Hang);
    let calls = a.state.calls();
    let mut hanging = client.clone();
    let call = tokio::spawn(async move { predict(&mut hanging, "m", None).await });
    eventually("the hanging call reached the worker", || async {
        (a.state.calls() > calls)
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    assert_eq!(a.state.cancelled.load(Ordering::SeqCst), 0);
    call.abort();
    eventually("the worker saw the cancellation", || async {
        (a.state.cancelled.load(Ordering::SeqCst) == 1)
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
}

async fn send_concurrently(cluster: &Cluster, total: usize, concurrency: usize) {
    let client = cluster.client();
    let results: Vec<_> = futures::stream::iter(0..total)
        .map(|_| {
            let mut client = client.clone();
            async move { predict(&mut client, "m", None).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_spread_over_workers() {
    let (cluster, a, b) = Cluster::two_workers_serving_m_v1().await;
    cluster.sync().await;
    for w in [&a, &b] {
        w.state.set_mode(Mode::Delay(Duration::from_millis(5)));
    }
    let (ca, cb) = (a.state.calls(), b.state.calls());
    send_concurrently(&cluster, 200, 200).await;
    let (na, nb) = (a.state.calls() - ca, b.state.calls() - cb);
    assert_eq!(na + nb, 200);
    assert!(na >= 50 && nb >= 50, "a {na}, b {nb}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_worker_gets_fewer_requests() {
    let (cluster, a, b) = Cluster::two_workers_serving_m_v1().await;
    cluster.sync().await;
    a.state.set_mode(Mode::Delay(Duration::from_millis(300)));
    let (ca, cb) = (a.state.calls(), b.state.calls());
    send_concurrently(&cluster, 200, 20).await;
    let (na, nb) = (a.state.calls() - ca, b.state.calls() - cb);
    // Requests in flight pile up on the slow worker, so the balancer prefers the other.
    assert!(na * 4 < nb, "slow a {na}, fast b {nb}");
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight() {
    let mut cluster = Cluster::start().await;
    let a = FakeWorker::start("a").await;
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 1).await;

    a.state.set_mode(Mode::Delay(Duration::from_millis(500)));
    let calls = a.state.calls();
    let mut slow = client.clone();
    let in_flight = tokio::spawn(async move { predict(&mut slow, "m", None).await });
    eventually("the slow call reached the worker", || async {
        (a.state.calls() > calls)
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    let stopped = cluster.shutdown();
    assert_eq!(in_flight.await.unwrap().unwrap(), ("a".into(), 1));
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("run did not return after its requests finished")
        .unwrap();
    // It no longer accepts: a new connection is refused.
    let err = predict(&mut cluster.client(), "m", None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

#[tokio::test]
async fn client_metadata_reaches_the_worker_without_hop_headers() {
    let cluster = Cluster::start().await;
    let a = FakeWorker::start("a").await;
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 1).await;
    let mut request = tonic::Request::new(PredictRequest {
        model_spec: Some(spec("m", None)),
        ..Default::default()
    });
    let m = request.metadata_mut();
    m.insert("authorization", "Bearer secret-token".parse().unwrap());
    m.insert("x-request-id", "req-42".parse().unwrap());
    m.insert("x-aspire-route", "forged".parse().unwrap());
    m.insert_bin(
        "tenant-bin",
        tonic::metadata::MetadataValue::from_bytes(&[0, 1, 2]),
    );
    client.predict(request).await.unwrap();
    let got = a.state.last().metadata;
    assert_eq!(got.get("authorization").unwrap(), "Bearer secret-token");
    assert_eq!(got.get("x-request-id").unwrap(), "req-42");
    assert_eq!(
        got.get_bin("tenant-bin")
            .unwrap()
            .to_bytes()
            .unwrap()
            .as_ref(),
        &[0, 1, 2]
    );
    assert!(got.get("x-aspire-route").is_none(), "{got:?}");
}

/// A router with `limits` on its command line and one fake worker serving model `m` v1,
/// ready to answer.
async fn limited_cluster(limits: &[&str]) -> (Cluster, FakeWorker) {
    let cluster = Cluster::start_with_args(Duration::from_secs(60), false, limits).await;
    let a = FakeWorker::start("a").await;
    cluster.model("m", &[1], &[1]).await;
    cluster.register(&a, &[(1, Available)]).await;
    eventually_default_version(&mut cluster.client(), "m", 1).await;
    (cluster, a)
}

/// A Predict for `m` whose input carries `bytes` bytes of `tensor_content`.
fn request_of(bytes: usize) -> PredictRequest {
    PredictRequest {
        model_spec: Some(spec("m", None)),
        inputs: HashMap::from([(
            "images".to_string(),
            TensorProto {
                dtype: 1,
                tensor_content: Bytes::from(vec![1u8; bytes]),
                ..Default::default()
            },
        )]),
        output_filter: vec![],
    }
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_refused_and_never_forwarded() {
    let (cluster, a) = limited_cluster(&[
        "--max-message-size-bytes=100000",
        "--max-inflight-bytes=100000",
    ])
    .await;
    let mut client = cluster.client();
    let calls = a.state.calls();
    let err = client.predict(request_of(200_000)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("at most 100000 bytes (--max-message-size-bytes)"),
        "{}",
        err.message()
    );
    assert_eq!(a.state.calls(), calls, "the worker saw it");
    // The router still serves.
    predict(&mut client, "m", None).await.unwrap();
}

#[tokio::test]
async fn past_the_in_flight_budget_the_router_sheds_at_once() {
    let (cluster, a) = limited_cluster(&[
        "--max-message-size-bytes=300000",
        "--max-inflight-bytes=500000",
    ])
    .await;
    let mut client = cluster.client();
    let request = || request_of(200_000);
    // Two held by a hanging worker take 400 kB of the 500 kB budget.
    a.state.set_mode(Mode::Hang);
    let base = a.state.calls();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let mut client = cluster.client();
            let r = request();
            tokio::spawn(async move { client.predict(r).await })
        })
        .collect();
    eventually("both held requests reach the worker", || {
        let a = &a;
        async move {
            (a.state.calls() >= base + 2)
                .then_some(())
                .ok_or(format!("{} calls", a.state.calls()))
        }
    })
    .await;
    let calls = a.state.calls();
    let started = std::time::Instant::now();
    let err = client.predict(request()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("the router's in-flight request budget is full")
            && err.message().contains("(--max-inflight-bytes)"),
        "{}",
        err.message()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(a.state.calls(), calls, "a shed request was forwarded");
    // Small requests still fit; once the held ones end, large ones pass again.
    a.state.set_mode(Mode::Normal);
    predict(&mut client, "m", None).await.unwrap();
    for h in held {
        h.abort();
    }
    eventually("the budget is given back", || {
        let mut client = client.clone();
        async move {
            client
                .predict(request())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
}
