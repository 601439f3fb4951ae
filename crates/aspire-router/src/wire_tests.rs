//! Unit tests and a small fuzz loop for [`super`]: malformed input is an error, never a panic.

use std::collections::HashMap;

use aspire_proto::TensorProto;
use aspire_proto::serving::{PredictRequest, model_spec::VersionChoice};

use super::*;

fn spec(name: &str, version: Option<i64>, signature: &str) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        version_choice: version.map(VersionChoice::Version),
        signature_name: signature.into(),
    }
}

fn request() -> PredictRequest {
    let content = TensorProto {
        dtype: 1,
        tensor_content: Bytes::from_static(&[0, 0, 128, 63, 0, 0, 0, 64]),
        ..Default::default()
    };
    let floats = TensorProto {
        dtype: 1,
        float_val: vec![1.5, -2.0, 3.25],
        ..Default::default()
    };
    PredictRequest {
        model_spec: Some(spec("mnist", Some(3), "predict_images")),
        inputs: HashMap::from([("images".to_string(), content), ("b".to_string(), floats)]),
        output_filter: vec!["scores".into()],
    }
}

fn field(number: u64, wire_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_varint((number << 3) | u64::from(wire_type), &mut out);
    if wire_type == LEN {
        prost::encoding::encode_varint(payload.len() as u64, &mut out);
    }
    out.extend_from_slice(payload);
    out
}

fn flatten(mut buf: impl Buf) -> Vec<u8> {
    buf.copy_to_bytes(buf.remaining()).to_vec()
}

fn other_bytes(split: &SplitRequest) -> Vec<u8> {
    split.other_fields.0.concat()
}

fn error_of(bytes: &[u8]) -> String {
    match split_predict_request(&Bytes::copy_from_slice(bytes)) {
        Ok(s) => panic!("{bytes:?} was accepted as {s:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn splits_a_prost_encoded_request() {
    let full = Bytes::from(request().encode_to_vec());
    let split = split_predict_request(&full).unwrap();
    assert_eq!(split.model_spec, spec("mnist", Some(3), "predict_images"));
    let spec_field_len = full.len() - split.other_fields.len();
    // prost writes field 1 first, so the rest is the tail, shared rather than copied.
    assert_eq!(other_bytes(&split), full[spec_field_len..].to_vec());
    assert_eq!(
        split.other_fields.0[1].as_ptr(),
        full[spec_field_len..].as_ptr()
    );
}

#[test]
fn forwarded_message_has_the_new_version_and_the_same_inputs() {
    let original = request();
    let split = split_predict_request(&Bytes::from(original.encode_to_vec())).unwrap();
    let mut new_spec = split.model_spec.clone();
    new_spec.version_choice = Some(VersionChoice::Version(7));
    let forwarded = Forwarded::new(&new_spec, split.other_fields);
    // A retry sends a clone: the same bytes.
    let again = forwarded.clone();
    let bytes = flatten(forwarded);
    assert_eq!(flatten(again), bytes);
    let decoded = PredictRequest::decode(&bytes[..]).unwrap();
    assert_eq!(
        decoded.model_spec,
        Some(spec("mnist", Some(7), "predict_images"))
    );
    assert_eq!(decoded.inputs, original.inputs);
    assert_eq!(decoded.output_filter, original.output_filter);
}

#[test]
fn model_spec_may_come_anywhere() {
    let spec_bytes = spec("m", None, "").encode_to_vec();
    let filter = field(3, LEN, b"out");
    let input = field(2, LEN, &field(1, LEN, b"x"));
    let body = [filter.clone(), field(1, LEN, &spec_bytes), input.clone()].concat();
    let split = split_predict_request(&Bytes::from(body)).unwrap();
    assert_eq!(split.model_spec.name, "m");
    assert_eq!(other_bytes(&split), [filter, input].concat());
}

#[test]
fn several_model_specs_merge() {
    let a = spec("a", None, "").encode_to_vec();
    let b = spec("", Some(2), "sig").encode_to_vec();
    let filter = field(3, LEN, b"out");
    let body = [field(1, LEN, &a), filter.clone(), field(1, LEN, &b)].concat();
    let split = split_predict_request(&Bytes::from(body)).unwrap();
    assert_eq!(split.model_spec, spec("a", Some(2), "sig"));
    assert_eq!(other_bytes(&split), filter);
}

#[test]
fn unknown_fields_of_every_wire_type_are_kept() {
    let spec_field = field(1, LEN, &spec("m", None, "").encode_to_vec());
    let group = [
        field(9, START_GROUP, &[]),
        field(1, VARINT, &[5]),
        field(9, END_GROUP, &[]),
    ]
    .concat();
    let others = [
        field(
            5,
            VARINT,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        field(6, FIXED64, &[1; 8]),
        field(7, FIXED32, &[2; 4]),
        group,
    ]
    .concat();
    let body = [spec_field, others.clone()].concat();
    let split = split_predict_request(&Bytes::from(body)).unwrap();
    assert_eq!(other_bytes(&split), others);
}

#[test]
fn malformed_requests_are_refused_with_a_reason() {
    let valid_spec = spec("m", None, "").encode_to_vec();
    let deep = vec![0x1b; 101];
    for (bytes, needle) in [
        (vec![], "model_spec is missing"),
        (field(3, LEN, b"x"), "model_spec is missing"),
        (vec![0x0a], "cut off"),
        (vec![0x0a, 0x05, 1, 2], "claims 5 bytes but only 2 follow"),
        (
            vec![
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            "claims",
        ),
        (vec![0x08, 0x01], "wire type 0"),
        (vec![0x00, 0x00], "invalid field tag 0"),
        (
            vec![0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
            "invalid field tag",
        ),
        (vec![0x0f], "wire type 7"),
        (vec![0x0e], "wire type 6"),
        (vec![0x0c], "not started"),
        (vec![0xff; 11], "overflows 64 bits"),
        (vec![0x1b], "not closed"),
        (vec![0x1b, 0x24], "closed as field 4"),
        (deep, "nest deeper"),
        (vec![0x29, 1, 2, 3], "cut off"),
        (vec![0x2d, 1], "cut off"),
        (
            field(1, LEN, &[0x0a, 0x02, 0xff, 0xfe]),
            "not a valid ModelSpec",
        ),
        ([field(1, LEN, &valid_spec), vec![0x12]].concat(), "cut off"),
    ] {
        let err = error_of(&bytes);
        assert!(err.contains(needle), "{bytes:?}: {err}");
        assert!(
            err.starts_with("the request is not a valid PredictRequest"),
            "{err}"
        );
    }
}

/// splitmix64: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn check_invariants(body: &[u8]) {
    let bytes = Bytes::copy_from_slice(body);
    if let Ok(split) = split_predict_request(&bytes) {
        assert!(split.other_fields.len() < body.len(), "{body:?}");
        let forwarded = Forwarded::new(&split.model_spec, split.other_fields.clone());
        let again = split_predict_request(&Bytes::from(flatten(forwarded))).unwrap();
        assert_eq!(again.model_spec, split.model_spec, "{body:?}");
        assert_eq!(other_bytes(&again), other_bytes(&split), "{body:?}");
    }
}

#[test]
fn fuzz_random_bytes() {
    let mut rng = Rng(1);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let len = rng.below(48);
        let mut body: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Start some with a plausible model_spec tag so the deeper paths are reached too.
        if len > 0 && rng.below(2) == 0 {
            body[0] = 0x0a;
        }
        check_invariants(&body);
        accepted += usize::from(split_predict_request(&Bytes::from(body)).is_ok());
    }
    assert!(
        accepted > 0,
        "no random input was valid: the loop tests nothing deep"
    );
}

#[test]
fn fuzz_mutated_requests() {
    let valid = request().encode_to_vec();
    let mut rng = Rng(2);
    let mut refused = 0;
    for _ in 0..20_000 {
        let mut body = valid.clone();
        for _ in 0..=rng.below(3) {
            match rng.below(3) {
                0 => {
                    let i = rng.below(body.len());
                    body[i] ^= 1 << rng.below(8);
                }
                1 => body.truncate(rng.below(body.len() + 1)),
                _ => body.insert(rng.below(body.len() + 1), rng.next() as u8),
            }
            if body.is_empty() {
                body.push(0x0a);
            }
        }
        check_invariants(&body);
        refused += usize::from(split_predict_request(&Bytes::from(body)).is_err());
    }
    assert!(
        refused > 1000,
        "mutations were hardly ever refused ({refused})"
    );
}
