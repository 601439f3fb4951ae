//! The worker's tensor codec ([`aspire_worker::codec`]).
//!
//! Input: one selector byte, then a serialized `TensorProto` (the seeds are inputs of real
//! requests). The selector picks the signature's dtype and how its shape relates to the
//! request's (copied with a batch dimension of -1, all -1, or none), so that most inputs
//! get past the signature check into value decoding.
//!
//! For any input: `decode_input` does not panic and its errors name the input. On success
//! the tensor has the signature's dtype and the request's shape, and exactly
//! `numel * dtype size` bytes; encoding it (both encodings) and decoding the result gives
//! the same tensor back.

use aspire_core::{DType, TensorSpec};
use aspire_proto::TensorProto;
use aspire_worker::codec::{OutputEncoding, decode_input, encode_output};
use prost::Message;

/// The decoded-size limit the target passes to `decode_input`: a request may declare any
/// shape, and one typed value fills every element; larger ones must be refused unallocated.
pub const MAX_DECODED_BYTES: usize = 1 << 20;

/// The input's name in every spec; errors must name it.
const NAME: &str = "fuzzed";

/// Checks one input (see the module docs).
pub fn check(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(proto) = TensorProto::decode(rest) else {
        return;
    };
    let spec = spec_for(selector, &proto);
    let tensor = match decode_input(&spec, &proto, MAX_DECODED_BYTES) {
        Ok(tensor) => tensor,
        Err(e) => {
            assert!(
                e.contains(&format!("'{NAME}'")),
                "error names no input: {e}"
            );
            return;
        }
    };
    let dims: Vec<i64> = proto
        .tensor_shape
        .as_ref()
        .map(|s| s.dim.iter().map(|d| d.size).collect())
        .unwrap_or_default();
    assert_eq!(tensor.dtype, spec.dtype);
    assert_eq!(tensor.shape, dims);
    assert_eq!(tensor.data.len(), tensor.numel() * tensor.dtype.size());

    let content = encode_output(&tensor, OutputEncoding::TensorContent);
    let back = decode_input(&spec, &content, MAX_DECODED_BYTES);
    assert_eq!(back.as_ref(), Ok(&tensor), "tensor_content round trip");

    let typed = encode_output(&tensor, OutputEncoding::Typed);
    let back = decode_input(&spec, &typed, MAX_DECODED_BYTES);
    assert_eq!(back, Ok(tensor), "typed round trip");
}

/// The signature spec for this input: dtype from the low nibble of `selector`, shape from
/// the high one.
fn spec_for(selector: u8, proto: &TensorProto) -> TensorSpec {
    let dtype = DType::ALL[usize::from(selector & 0x0f) % DType::ALL.len()];
    let dims: Vec<i64> = proto
        .tensor_shape
        .as_ref()
        .map(|s| s.dim.iter().map(|d| d.size).collect())
        .unwrap_or_default();
    let shape = match selector >> 4 {
        0..=9 => Some(
            dims.iter()
                .enumerate()
                .map(|(i, d)| if i == 0 { -1 } else { *d })
                .collect(),
        ),
        10..=12 => Some(vec![-1; dims.len()]),
        _ => None,
    };
    TensorSpec {
        name: NAME.to_string(),
        dtype,
        shape,
    }
}

