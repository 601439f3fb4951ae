//! Which version and worker a request goes to.

use aspire_proto::serving::PredictRequest;
use prost::Message;
use tonic::Code;

use crate::common::*;
use crate::fake_worker::FakeWorker;

fn sent_version(worker: &FakeWorker) -> Option<i64> {
    let body = worker.state.last().body;
    let spec = PredictRequest::decode(body).unwrap().model_spec.unwrap();
    match spec.version_choice {
        Some(aspire_proto::serving::model_spec::VersionChoice::Version(v)) => Some(v),
        _ => None,
    }
}

#[tokio::test]
async fn default_goes_to_the_highest_desired_available_version_explicitly() {
    let cluster = Cluster::start().await;
    let (a, b) = (FakeWorker::start("a").await, FakeWorker::start("b").await);
    cluster.model("m", &[1, 2, 3], &[2]).await;
    cluster.register(&a, &[(1, Available), (2, Loading)]).await;
    cluster.register(&b, &[(1, Available)]).await;
    let mut client = cluster.client();

    // Version 2 is desired but only loading: version 1 serves meanwhile.
    eventually_default_version(&mut client, "m", 1).await;
    cluster
        .register(&a, &[(1, Available), (2, Available)])
        .await;
    eventually_default_version(&mut client, "m", 2).await;
    let (worker, version) = predict(&mut client, "m", None).await.unwrap();
    assert_eq!((worker.as_str(), version), ("a", 2));
    // The worker was told the version; it did not have to agree on a default.
    assert_eq!(sent_version(&a), Some(2));

    // An explicit version goes where that version is.
    for _ in 0..10 {
        let (worker, version) = predict(&mut client, "m", Some(1)).await.unwrap();
        assert!(worker == "a" || worker == "b");
        assert_eq!(version, 1);
    }
    let err = predict(&mut client, "m", Some(3)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.message(),
        "version 3 is not AVAILABLE on any worker; available versions of model 'm': 1, 2"
    );

    // A newer desired version that is still loading keeps traffic on the highest
    // AVAILABLE one, not on the desired-but-absent one.
    cluster.model("m", &[1, 2, 3], &[3]).await;
    cluster
        .register(&a, &[(1, Available), (2, Available), (3, Loading)])
        .await;
    cluster.register(&b, &[(1, Available), (3, Loading)]).await;
    cluster.sync().await;
    for _ in 0..10 {
        assert_eq!(
            predict(&mut client, "m", None).await.unwrap(),
            ("a".into(), 2)
        );
    }
}

#[tokio::test]
async fn unknown_models_labels_and_missing_workers() {
    let cluster = Cluster::start().await;
    let a = FakeWorker::start("a").await;
    cluster.model("m", &[1], &[1]).await;
    cluster.model("n", &[1], &[1]).await;
    let mut client = cluster.client();
    // Known model, nobody serving it: UNAVAILABLE (retry later), not NOT_FOUND.
    let err = eventually("n is known", || {
        let mut client = client.clone();
        async move {
            match predict(&mut client, "n", None).await {
                Err(e) if e.code() == Code::Unavailable => Ok(e),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(
        err.message()
            .contains("no worker has model 'n' AVAILABLE yet"),
        "{err:?}"
    );

    cluster.register(&a, &[(1, Available)]).await;
    eventually_default_version(&mut client, "m", 1).await;
    let err = predict(&mut client, "x", None).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.message(),
        "model 'x' is not served; models served: m, n"
    );

    let mut labelled = PredictRequest {
        model_spec: Some(spec("m", None)),
        ..Default::default()
    };
    labelled.model_spec.as_mut().unwrap().version_choice =
        Some(aspire_proto::serving::model_spec::VersionChoice::VersionLabel("stable".into()));
    let err = client.predict(labelled).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("version_label 'stable' is not supported")
    );

    let err = client.predict(PredictRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("model_spec is missing"), "{err:?}");
    assert_eq!(
        a.state.calls(),
        1,
        "refused requests must not reach a worker"
    );
}

#[tokio::test]
async fn valid_pins_move_default_traffic_and_bad_pins_are_ignored() {
    let cluster = Cluster::start().await;
    let a = FakeWorker::start("a").await;
    cluster.model("m", &[1, 2], &[2]).await;
    cluster
        .register(&a, &[(1, Available), (2, Available)])
        .await;
    let mut client = cluster.client();
    eventually_default_version(&mut client, "m", 2).await;

    cluster.pin("m", Some("1")).await;
    eventually_default_version(&mut client, "m", 1).await;
    // A pin to a version not in storage is ignored: back to the aspired version.
    cluster.pin("m", Some("7")).await;
    eventually_default_version(&mut client, "m", 2).await;
    cluster.pin("m", Some("1")).await;
    eventually_default_version(&mut client, "m", 1).await;
    cluster.pin("m", Some("garbage")).await;
    eventually_default_version(&mut client, "m", 2).await;

    // A valid pin to a version no worker has AVAILABLE yet keeps traffic where it is...
    cluster.pin("m", None).await;
    cluster.register(&a, &[(1, Loading), (2, Available)]).await;
    cluster.pin("m", Some("1")).await;
    cluster.sync().await;
    for _ in 0..5 {
        assert_eq!(
            predict(&mut client, "m", None).await.unwrap(),
            ("a".into(), 2)
        );
    }
    // ...and moves it once the pinned version is AVAILABLE.
    cluster
        .register(&a, &[(1, Available), (2, Available)])
        .await;
    eventually_default_version(&mut client, "m", 1).await;
}
