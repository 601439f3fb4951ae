//! What the router answers itself: model status, metadata, health, unimplemented methods.

use std::collections::BTreeMap;

use aspire_core::{ModelName, SignatureMap, VersionStatus, WorkerRecord};
use aspire_proto::serving::model_service_client::ModelServiceClient;
use aspire_proto::serving::{
    ClassificationRequest, GetModelMetadataRequest, GetModelStatusRequest, ModelVersionStatus,
    SignatureDefMap, model_spec::VersionChoice,
};
use prost::Message;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use aspire_registry::Registry;

use crate::common::*;
use crate::fake_worker::FakeWorker;

fn worker_record(
    worker: &FakeWorker,
    versions: &[(u64, aspire_core::records::VersionState, Option<&str>)],
) -> WorkerRecord {
    let statuses = versions
        .iter()
        .map(|(n, state, error)| {
            let status = VersionStatus {
                state: *state,
                error: error.map(str::to_string),
            };
            (v(*n), status)
        })
        .collect();
    WorkerRecord {
        address: worker.addr.to_string(),
        device: "cpu".into(),
        models: BTreeMap::from([(ModelName::new("m").unwrap(), statuses)]),
        ..Default::default()
    }
}

fn summary(statuses: &[ModelVersionStatus]) -> Vec<(i64, i32, i32, String)> {
    statuses
        .iter()
        .map(|s| {
            let st = s.status.clone().unwrap_or_default();
            (s.version, s.state, st.error_code, st.error_message)
        })
        .collect()
}

#[tokio::test]
async fn model_status_aggregates_the_workers() {
    let cluster = Cluster::start().await;
    let (a, b) = (FakeWorker::start("a").await, FakeWorker::start("b").await);
    cluster.model("m", &[1, 2, 3, 4, 5], &[5]).await;
    let rec_a = worker_record(
        &a,
        &[
            (1, Available, None),
            (2, Loading, None),
            (3, End, Some("load failed: bad file")),
            (4, End, Some("out of memory")),
        ],
    );
    let rec_b = worker_record(
        &b,
        &[
            (1, End, Some("evicted")),
            (2, Start, None),
            (3, Unloading, None),
            (4, Available, None),
        ],
    );
    cluster.registry.put_worker("a", &rec_a).await.unwrap();
    cluster.registry.put_worker("b", &rec_b).await.unwrap();
    cluster.sync().await;

    let mut models = ModelServiceClient::new(cluster.channel());
    let status = |version: Option<i64>| GetModelStatusRequest {
        model_spec: Some(spec("m", version)),
    };
    let all = models
        .get_model_status(status(None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        summary(&all.model_version_status),
        vec![
            // Desired, on no worker yet.
            (5, 10, 0, String::new()),
            // AVAILABLE somewhere wins, and another worker's failure is no error.
            (4, 30, 0, String::new()),
            // Otherwise the most advanced state, with a failed load's error.
            (3, 40, 2, "worker 'a': load failed: bad file".into()),
            (2, 20, 0, String::new()),
            (1, 30, 0, String::new()),
        ]
    );
    let one = models
        .get_model_status(status(Some(3)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.model_version_status.len(), 1);
    assert_eq!(one.model_version_status[0].version, 3);
    let err = models.get_model_status(status(Some(9))).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message()
            .contains("version 9 is not known to any worker"),
        "{err:?}"
    );
    let err = models
        .get_model_status(GetModelStatusRequest {
            model_spec: Some(spec("nope", None)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().starts_with("model 'nope' is not served"),
        "{err:?}"
    );
}

fn signatures(input: &str) -> SignatureMap {
    SignatureMap::from_json(
        format!(
            r#"{{"signatures": {{"predict": {{
                "inputs": [{{"name": "{input}", "dtype": "float32", "shape": [-1, 3]}}],
                "outputs": [{{"name": "out", "dtype": "float32", "shape": [-1]}}]}}}}}}"#
        )
        .as_bytes(),
    )
    .unwrap()
}

#[tokio::test]
async fn metadata_comes_from_the_registry_for_the_routed_version() {
    let cluster = Cluster::start().await;
    let a = FakeWorker::start("a").await;
    let sigs = [(1, signatures("one")), (2, signatures("two"))];
    cluster.model_with_signatures("m", &sigs, &[2]).await;
    cluster.sync().await;
    let mut client = cluster.client();
    let metadata = |version: Option<i64>| GetModelMetadataRequest {
        model_spec: Some(spec("m", version)),
        metadata_field: vec!["signature_def".into()],
    };
    let input_of = |resp: aspire_proto::serving::GetModelMetadataResponse| {
        let any = &resp.metadata["signature_def"];
        assert_eq!(any.type_url, aspire_proto::SIGNATURE_DEF_MAP_TYPE_URL);
        let map = SignatureDefMap::decode(&any.value[..]).unwrap();
        let def = &map.signature_def["predict"];
        assert_eq!(def.method_name, "tensorflow/serving/predict");
        let version = match resp.model_spec.unwrap().version_choice {
            Some(VersionChoice::Version(v)) => v,
            other => panic!("{other:?}"),
        };
        (version, def.inputs.keys().next().unwrap().clone())
    };

    // Nothing loaded: the newest version in storage.
    let resp = client
        .get_model_metadata(metadata(None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(input_of(resp), (2, "two".to_string()));
    // Only version 1 is AVAILABLE: metadata describes what Predict would serve.
    cluster.register(&a, &[(1, Available), (2, Loading)]).await;
    eventually_default_version(&mut client, "m", 1).await;
    let resp = client
        .get_model_metadata(metadata(None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(input_of(resp), (1, "one".to_string()));
    let resp = client
        .get_model_metadata(metadata(Some(2)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(input_of(resp), (2, "two".to_string()));

    let err = client
        .get_model_metadata(metadata(Some(9)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.message(),
        "version 9 is not in storage; available versions of model 'm': 1, 2"
    );
    let mut bad = metadata(None);
    bad.metadata_field = vec!["graph".into()];
    let err = client.get_model_metadata(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn health_and_unimplemented_methods() {
    let cluster = Cluster::start().await;
    let mut health = HealthClient::new(cluster.channel());
    for service in ["", "tensorflow.serving.PredictionService"] {
        eventually("the router reports SERVING", || {
            let mut health = health.clone();
            async move {
                let request = HealthCheckRequest {
                    service: service.into(),
                };
                let status = health.check(request).await.map_err(|e| format!("{e:?}"))?;
                (status.get_ref().status == ServingStatus::Serving as i32)
                    .then_some(())
                    .ok_or(format!("{status:?}"))
            }
        })
        .await;
    }
    let _ = &mut health;
    let mut client = cluster.client();
    let err = client
        .classify(ClassificationRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(err.message().contains("Predict only"), "{err:?}");
}
