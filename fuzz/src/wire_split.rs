//! The router's wire scanner ([`aspire_router::wire`]) against prost.
//!
//! For any bytes: `split_predict_request` does not panic. When prost decodes them as a
//! `PredictRequest` with a `model_spec`, the split succeeds and agrees with prost's
//! `model_spec`, and the forwarded message (a new `model_spec` plus the other fields as
//! they came) decodes to the same request with the new `model_spec`. When prost finds no
//! `model_spec`, the split fails. Reading the forwarded [`bytes::Buf`] in uneven steps
//! yields the same bytes as reading it at once.

use std::collections::BTreeMap;

use aspire_proto::serving::model_spec::VersionChoice;
use aspire_proto::serving::{ModelSpec, PredictRequest};
use aspire_router::wire::{Forwarded, split_predict_request};
use bytes::{Buf, Bytes};
use prost::Message;

/// Checks one input (see the module docs).
pub fn check(data: &[u8]) {
    let body = Bytes::copy_from_slice(data);
    let split = split_predict_request(&body);
    let decoded = PredictRequest::decode(data);
    if let Ok(request) = &decoded {
        match (&request.model_spec, &split) {
            (Some(spec), Ok(split)) => assert_eq!(spec, &split.model_spec, "model_spec differs"),
            (None, Err(_)) => {}
            (Some(_), Err(e)) => panic!("prost decodes the request but the scanner says: {e}"),
            (None, Ok(split)) => panic!("prost finds no model_spec, the scanner {split:?}"),
        }
    }
    let Ok(split) = split else {
        return;
    };
    let new_spec = ModelSpec {
        name: format!("{}-routed", split.model_spec.name),
        version_choice: Some(VersionChoice::Version(7)),
        signature_name: split.model_spec.signature_name.clone(),
    };
    let forwarded = Forwarded::new(&new_spec, split.other_fields.clone());
    let at_once = forwarded.clone().copy_to_bytes(forwarded.remaining());
    assert_eq!(
        at_once.len(),
        new_spec.encoded_len()
            + 1
            + prost::encoding::encoded_len_varint(new_spec.encoded_len() as u64)
            + split.other_fields.len()
    );
    let step = usize::from(data.first().copied().unwrap_or(1) % 7) + 1;
    assert_eq!(
        read_in_steps(forwarded, step),
        at_once,
        "stepwise read differs"
    );
    if let Ok(mut expected) = decoded {
        let back = PredictRequest::decode(at_once).expect("the forwarded request decodes");
        expected.model_spec = Some(new_spec);
        assert_eq!(
            canonical(&back),
            canonical(&expected),
            "the forwarded request differs"
        );
    }
}

/// A request in a form that compares equal when the requests are (floats by their bits,
/// so NaN equals itself; the map by key, whatever its order).
fn canonical(r: &PredictRequest) -> (Option<ModelSpec>, BTreeMap<&str, Vec<u8>>, &[String]) {
    let inputs = r
        .inputs
        .iter()
        .map(|(k, v)| (k.as_str(), v.encode_to_vec()))
        .collect();
    (r.model_spec.clone(), inputs, &r.output_filter)
}

/// Reads `buf` `step` bytes at a time through `chunk` and `advance`.
fn read_in_steps(mut buf: impl Buf, step: usize) -> Bytes {
    let mut out = Vec::with_capacity(buf.remaining());
    while buf.has_remaining() {
        let chunk = buf.chunk();
        assert!(!chunk.is_empty(), "an empty chunk with bytes remaining");
        let n = chunk.len().min(step);
        out.extend_from_slice(&chunk[..n]);
        buf.advance(n);
    }
    assert!(buf.chunk().is_empty());
    Bytes::from(out)
}
