//! `run_client` against an in-process fake PredictionService whose answers are a known
//! function of each image, so the expected wrong answers, failures and versions can be
//! computed exactly. (The real server is exercised end to end elsewhere.)

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aspire_mnist::client::{ClientOptions, Encoding};
use aspire_mnist::{data, run_client};
use aspire_proto::serving::model_spec::VersionChoice;
use aspire_proto::serving::prediction_service_server::{
    PredictionService, PredictionServiceServer,
};
use aspire_proto::serving::*;
use aspire_proto::{DataType, TensorProto};
use clap::Parser;
use tonic::{Request, Response, Status};

fn data_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist_5k.csv.gz")
}

/// What the fake does with an image: fail it, or answer a digit from some version.
fn key(image: &[f32]) -> usize {
    (image.iter().sum::<f32>() * 997.0) as usize
}
fn fails(image: &[f32]) -> bool {
    key(image).is_multiple_of(37)
}
fn digit(image: &[f32]) -> usize {
    key(image) % 10
}
fn version(image: &[f32]) -> i64 {
    1 + (key(image) % 2) as i64
}

#[derive(Default)]
struct Fake {
    typed: AtomicUsize,
    content: AtomicUsize,
}

#[tonic::async_trait]
impl PredictionService for Fake {
    async fn predict(
        &self,
        request: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        let req = request.into_inner();
        let spec = req.model_spec.unwrap_or_default();
        if spec.name != "mnist" || spec.signature_name != "predict_images" {
            return Err(Status::not_found(format!("{spec:?}")));
        }
        let t = &req.inputs["images"];
        let image: Vec<f32> = if t.float_val.is_empty() {
            self.content.fetch_add(1, Ordering::Relaxed);
            t.tensor_content
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        } else {
            self.typed.fetch_add(1, Ordering::Relaxed);
            t.float_val.clone()
        };
        if fails(&image) {
            return Err(Status::unavailable("fake failure"));
        }
        let mut scores = vec![0.01f32; 10];
        scores[digit(&image)] = 0.91;
        // Answer in the encoding asked in, so both of the client's decoders run.
        let mut out = TensorProto {
            dtype: DataType::DtFloat as i32,
            ..Default::default()
        };
        if t.float_val.is_empty() {
            let bytes: Vec<u8> = scores.iter().flat_map(|v| v.to_le_bytes()).collect();
            out.tensor_content = bytes.into();
        } else {
            out.float_val = scores;
        }
        Ok(Response::new(PredictResponse {
            model_spec: Some(ModelSpec {
                version_choice: Some(VersionChoice::Version(version(&image))),
                ..spec
            }),
            outputs: [("scores".to_string(), out)].into(),
        }))
    }

    async fn classify(
        &self,
        _: Request<ClassificationRequest>,
    ) -> Result<Response<ClassificationResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn regress(
        &self,
        _: Request<RegressionRequest>,
    ) -> Result<Response<RegressionResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn multi_inference(
        &self,
        _: Request<MultiInferenceRequest>,
    ) -> Result<Response<MultiInferenceResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_model_metadata(
        &self,
        _: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

#[tokio::test]
async fn counts_wrong_answers_failures_and_versions_exactly_in_both_encodings() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = Arc::new(Fake::default());
    let incoming = futures::stream::unfold(listener, |l| async move {
        let accepted = l.accept().await.map(|(s, _)| s);
        Some((accepted, l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PredictionServiceServer::from_arc(fake.clone()))
            .serve_with_incoming(incoming),
    );

    // 1,100 requests: past the 1,000 test images, so the client starts over at image 0.
    let num_tests = 1100;
    let test = data::load(&data_path()).unwrap().test;
    let (mut wrong, mut failed, mut v1, mut v2) = (0, 0, 0, 0);
    for i in 0..num_tests {
        let image = test.image(i % test.len());
        if fails(image) {
            failed += 1;
        } else {
            wrong += usize::from(digit(image) != usize::from(test.labels[i % test.len()]));
            if version(image) == 1 {
                v1 += 1
            } else {
                v2 += 1
            }
        }
    }
    assert!(
        failed > 0 && wrong > 0 && v1 > 0 && v2 > 0,
        "the fake must exercise every count"
    );

    for encoding in ["typed", "content"] {
        let opts = ClientOptions::try_parse_from([
            "mnist-client",
            &format!("--num_tests={num_tests}"),
            &format!("--server={addr}"),
            "--concurrency=8",
            "--encoding",
            encoding,
            "--data",
            data_path().to_str().unwrap(),
        ])
        .unwrap();
        let report = run_client(&opts).await.unwrap();
        println!("{encoding}: {}", report.counts_line());
        assert_eq!(report.requests, num_tests);
        assert_eq!(report.wrong_predictions, wrong, "{encoding}");
        assert_eq!(
            report.rpc_failures.get("Unavailable"),
            Some(&failed),
            "{encoding}"
        );
        assert_eq!(report.failed_rpcs(), failed);
        assert_eq!(report.bad_responses, 0);
        assert_eq!(report.versions.get(&1), Some(&v1));
        assert_eq!(report.versions.get(&2), Some(&v2));
        assert_eq!(report.errors(), wrong + failed);
        assert!(!report.all_answered());
        assert_eq!(
            report.first_failure.as_deref(),
            Some("Unavailable: fake failure")
        );
        let expected = if opts.encoding == Encoding::Typed {
            &fake.typed
        } else {
            &fake.content
        };
        assert_eq!(expected.swap(0, Ordering::Relaxed), num_tests, "{encoding}");
    }
}
