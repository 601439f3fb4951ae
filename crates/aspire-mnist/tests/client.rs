//! `mnist-client`'s pure parts: flags (TensorFlow's snake_case and kebab-case), requests,
//! reading scores, and the error-rate arithmetic. The RPC path is exercised end to end
//! against the real server elsewhere.

use std::collections::BTreeMap;
use std::time::Duration;

use aspire_mnist::client::{
    ClientOptions, ClientReport, Encoding, argmax, build_request, endpoint_uri, error_rate,
    format_error_rate, scores_from_response,
};
use aspire_proto::serving::PredictResponse;
use aspire_proto::serving::model_spec::VersionChoice;
use aspire_proto::{DataType, TensorProto};
use clap::Parser;

fn parse(args: &[&str]) -> Result<ClientOptions, clap::Error> {
    ClientOptions::try_parse_from(std::iter::once("mnist-client").chain(args.iter().copied()))
}

#[test]
fn accepts_the_tutorials_snake_case_flags() {
    let opts = parse(&[
        "--num_tests=1000",
        "--server=localhost:9000",
        "--concurrency=10",
    ])
    .unwrap();
    assert_eq!(opts.num_tests, 1000);
    assert_eq!(opts.server, "localhost:9000");
    assert_eq!(opts.concurrency, 10);
    assert_eq!(opts.model_name, "mnist");
    assert_eq!(opts.signature_name, "predict_images");
    assert_eq!(opts.model_version, None);
    assert_eq!(opts.encoding, Encoding::Typed);
    assert_eq!(opts.timeout_ms, 5000);

    let opts = parse(&[
        "--model_name",
        "m2",
        "--model_version",
        "7",
        "--signature_name",
        "s",
    ])
    .unwrap();
    assert_eq!(opts.model_name, "m2");
    assert_eq!(opts.model_version.map(|v| v.get()), Some(7));
    assert_eq!(opts.signature_name, "s");
}

#[test]
fn accepts_kebab_case_flags() {
    let opts = parse(&[
        "--num-tests",
        "5",
        "--model-name",
        "other",
        "--signature-name",
        "serving_default",
        "--model-version",
        "2",
        "--encoding",
        "content",
        "--timeout-ms",
        "250",
        "--data",
        "x.csv.gz",
    ])
    .unwrap();
    assert_eq!(opts.num_tests, 5);
    assert_eq!(opts.model_name, "other");
    assert_eq!(opts.signature_name, "serving_default");
    assert_eq!(opts.model_version.map(|v| v.get()), Some(2));
    assert_eq!(opts.encoding, Encoding::Content);
    assert_eq!(opts.timeout_ms, 250);
    assert_eq!(opts.data.to_str(), Some("x.csv.gz"));
}

#[test]
fn rejects_bad_flag_values() {
    for bad in [
        &["--encoding", "json"][..],
        &["--model-version", "0"],
        &["--num_tests", "-3"],
        &["--concurrency", "many"],
    ] {
        assert!(parse(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn error_rate_arithmetic_matches_the_tutorial() {
    assert_eq!(
        format_error_rate(error_rate(131, 1000)),
        "Inference error rate: 13.1%"
    );
    assert_eq!(
        format_error_rate(error_rate(0, 1000)),
        "Inference error rate: 0.0%"
    );
    assert_eq!(
        format_error_rate(error_rate(1, 3)),
        "Inference error rate: 33.3%"
    );
    assert_eq!(
        format_error_rate(error_rate(1000, 1000)),
        "Inference error rate: 100.0%"
    );
    assert_eq!(error_rate(0, 0), 0.0);

    // Failed RPCs and unusable answers count as errors, as in mnist_client.py.
    let report = ClientReport {
        requests: 1000,
        wrong_predictions: 90,
        rpc_failures: BTreeMap::from([
            ("Unavailable".to_string(), 8),
            ("DeadlineExceeded".to_string(), 2),
        ]),
        bad_responses: 1,
        versions: BTreeMap::from([(1, 600), (2, 389)]),
        elapsed: Duration::from_millis(1500),
        ..Default::default()
    };
    assert_eq!(report.failed_rpcs(), 10);
    assert_eq!(report.errors(), 101);
    assert!(!report.all_answered());
    assert_eq!(
        format_error_rate(report.error_rate()),
        "Inference error rate: 10.1%"
    );
    assert_eq!(
        report.counts_line(),
        "1000 requests in 1.50 s; wrong: 90; RPC failures: 10 (DeadlineExceeded: 2, Unavailable: 8); \
         unusable answers: 1; answered by version 1: 600, version 2: 389"
    );
}

#[test]
fn argmax_picks_the_first_largest_score() {
    assert_eq!(argmax(&[0.1, 0.7, 0.2]), Some(1));
    assert_eq!(argmax(&[0.5, 0.5]), Some(0));
    assert_eq!(argmax(&[]), None);
}

#[test]
fn builds_the_tutorials_request_in_both_encodings() {
    let image: Vec<f32> = (0..784).map(|i| i as f32 / 784.0).collect();
    let mut opts = parse(&["--model-version", "2"]).unwrap();
    let req = build_request(&opts, &image);
    let spec = req.model_spec.as_ref().unwrap();
    assert_eq!(spec.name, "mnist");
    assert_eq!(spec.signature_name, "predict_images");
    assert_eq!(spec.version_choice, Some(VersionChoice::Version(2)));
    let t = &req.inputs["images"];
    assert_eq!(t.dtype, DataType::DtFloat as i32);
    let dims: Vec<i64> = t
        .tensor_shape
        .as_ref()
        .unwrap()
        .dim
        .iter()
        .map(|d| d.size)
        .collect();
    assert_eq!(dims, [1, 784]);
    assert_eq!(t.float_val, image);
    assert!(t.tensor_content.is_empty());

    opts.encoding = Encoding::Content;
    opts.model_version = None;
    let req = build_request(&opts, &image);
    assert_eq!(req.model_spec.as_ref().unwrap().version_choice, None);
    let t = &req.inputs["images"];
    assert!(t.float_val.is_empty());
    assert_eq!(t.tensor_content.len(), 784 * 4);
    assert_eq!(t.tensor_content[4..8], (1.0f32 / 784.0).to_le_bytes());
}

#[test]
fn reads_scores_from_float_val_or_tensor_content() {
    let scores: Vec<f32> = vec![0.0, 0.0, 0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let response = |tensor: TensorProto| PredictResponse {
        outputs: [("scores".to_string(), tensor)].into(),
        model_spec: None,
    };
    let typed = TensorProto {
        dtype: DataType::DtFloat as i32,
        float_val: scores.clone(),
        ..Default::default()
    };
    assert_eq!(
        scores_from_response(&response(typed.clone())).unwrap(),
        scores
    );
    let bytes: Vec<u8> = scores.iter().flat_map(|v| v.to_le_bytes()).collect();
    let content = TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_content: bytes.into(),
        ..Default::default()
    };
    assert_eq!(scores_from_response(&response(content)).unwrap(), scores);

    let double = TensorProto {
        dtype: DataType::DtDouble as i32,
        ..typed.clone()
    };
    assert!(
        scores_from_response(&response(double))
            .unwrap_err()
            .contains("DT_DOUBLE")
    );
    let short = TensorProto {
        float_val: vec![1.0; 9],
        ..typed.clone()
    };
    assert!(
        scores_from_response(&response(short))
            .unwrap_err()
            .contains("9 values")
    );
    let renamed = PredictResponse {
        outputs: [("probabilities".to_string(), typed)].into(),
        model_spec: None,
    };
    let err = scores_from_response(&renamed).unwrap_err();
    assert!(
        err.contains("'scores'") && err.contains("probabilities"),
        "{err}"
    );
}

#[test]
fn server_addresses_become_uris() {
    assert_eq!(endpoint_uri("localhost:9000"), "http://localhost:9000");
    assert_eq!(
        endpoint_uri("https://mnist.example:443"),
        "https://mnist.example:443"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_an_error_that_names_it() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut opts = parse(&[
        "--server",
        &format!("127.0.0.1:{port}"),
        "--timeout-ms",
        "2000",
    ])
    .unwrap();
    opts.data =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist_5k.csv.gz");
    let err = aspire_mnist::run_client(&opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("http://127.0.0.1:{port}")), "{err}");
    assert!(err.contains("is the server running"), "{err}");
}
