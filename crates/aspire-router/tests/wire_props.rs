//! Property tests of the router's wire scanner against prost: for generated
//! `PredictRequest`s, and for their encodings cut or with bytes changed, the split agrees
//! with what prost decodes, and the forwarded message is the same request with the new
//! `model_spec`. A short run (256 cases each) in every `cargo test`; `make fuzz` explores
//! the scanner for longer.

use std::collections::{BTreeMap, HashMap};

use aspire_proto::TensorProto;
use aspire_proto::serving::model_spec::VersionChoice;
use aspire_proto::serving::{ModelSpec, PredictRequest};
use aspire_router::wire::{Forwarded, split_predict_request};
use bytes::{Buf, Bytes};
use proptest::prelude::*;
use prost::Message;

fn model_spec() -> impl Strategy<Value = ModelSpec> {
    (
        "[a-z0-9_.-]{0,12}",
        prop::option::of(prop_oneof![
            any::<i64>().prop_map(VersionChoice::Version),
            "[a-z]{0,8}".prop_map(VersionChoice::VersionLabel),
        ]),
        "[a-z_]{0,12}",
    )
        .prop_map(|(name, version_choice, signature_name)| ModelSpec {
            name,
            version_choice,
            signature_name,
        })
}

fn tensor() -> impl Strategy<Value = TensorProto> {
    (
        0..25i32,
        prop::collection::vec(any::<f32>(), 0..16),
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(any::<i64>(), 0..8),
    )
        .prop_map(|(dtype, float_val, content, int64_val)| TensorProto {
            dtype,
            float_val,
            tensor_content: Bytes::from(content),
            int64_val,
            ..TensorProto::default()
        })
}

fn request() -> impl Strategy<Value = PredictRequest> {
    (
        prop::option::of(model_spec()),
        prop::collection::hash_map("[a-z]{1,6}", tensor(), 0..4),
        prop::collection::vec("[a-z]{0,6}", 0..3),
    )
        .prop_map(|(model_spec, inputs, output_filter)| PredictRequest {
            model_spec,
            inputs,
            output_filter,
        })
}

/// Compares requests with floats by their bits (NaN equals itself) and the map by key.
fn canonical(r: &PredictRequest) -> (Option<ModelSpec>, BTreeMap<String, Vec<u8>>, Vec<String>) {
    let inputs = r
        .inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.encode_to_vec()))
        .collect();
    (r.model_spec.clone(), inputs, r.output_filter.clone())
}

/// What must hold for any bytes: see the module docs.
fn check_against_prost(body: &[u8]) -> Result<(), TestCaseError> {
    let split = split_predict_request(&Bytes::copy_from_slice(body));
    let decoded = PredictRequest::decode(body);
    if let Ok(request) = &decoded {
        match (&request.model_spec, &split) {
            (Some(spec), Ok(split)) => prop_assert_eq!(spec, &split.model_spec),
            (None, Err(_)) => {}
            (Some(_), Err(e)) => prop_assert!(false, "prost decodes it, the scanner says {}", e),
            (None, Ok(s)) => prop_assert!(false, "prost sees no model_spec, the scanner {:?}", s),
        }
    }
    if let (Ok(split), Ok(mut expected)) = (split, decoded) {
        let routed = ModelSpec {
            version_choice: Some(VersionChoice::Version(42)),
            ..split.model_spec.clone()
        };
        let mut forwarded = Forwarded::new(&routed, split.other_fields);
        let bytes = forwarded.copy_to_bytes(forwarded.remaining());
        let back = PredictRequest::decode(bytes).expect("the forwarded request decodes");
        expected.model_spec = Some(routed);
        prop_assert_eq!(canonical(&back), canonical(&expected));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_requests_split_as_prost_decodes_them(request in request()) {
        check_against_prost(&request.encode_to_vec())?;
    }

    #[test]
    fn model_spec_anywhere_and_repeated_is_merged_as_prost_does(
        first in request(), second in request()
    ) {
        // Concatenated messages merge: the later model_spec's fields win.
        let mut body = first.encode_to_vec();
        body.extend(second.encode_to_vec());
        check_against_prost(&body)?;
    }

    #[test]
    fn damaged_requests_are_refused_or_agree_with_prost(
        request in request(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0..3u8), 1..4),
    ) {
        let mut body = request.encode_to_vec();
        for (at, byte, how) in edits {
            let i = at % (body.len() + 1);
            match how {
                0 if i < body.len() => body[i] = byte,
                1 => body.truncate(i),
                _ => body.insert(i, byte),
            }
        }
        check_against_prost(&body)?;
    }

    #[test]
    fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..64)) {
        check_against_prost(&body)?;
    }
}

#[test]
fn an_empty_request_has_no_model_spec() {
    let empty = PredictRequest {
        inputs: HashMap::new(),
        ..PredictRequest::default()
    };
    let err = split_predict_request(&Bytes::from(empty.encode_to_vec())).unwrap_err();
    assert!(err.to_string().contains("model_spec is missing"), "{err}");
}
