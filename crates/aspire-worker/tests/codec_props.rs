//! Property tests of the tensor codec: every tensor survives encoding and decoding in both
//! encodings, and any `TensorProto` is decoded or refused with a sentence naming the
//! input, never a panic. A short run (256 cases each) in every `cargo test`; `make fuzz`
//! explores the codec for longer.

use aspire_core::{DType, TensorSpec};
use aspire_proto::TensorProto;
use aspire_proto::tensorflow::TensorShapeProto;
use aspire_proto::tensorflow::tensor_shape_proto::Dim;
use aspire_worker::codec::{OutputEncoding, decode_input, encode_output};
use aspire_worker::tensor::HostTensor;
use bytes::Bytes;
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = DType> {
    (0..DType::ALL.len()).prop_map(|i| DType::ALL[i])
}

/// A tensor of up to 4 dimensions of up to 5 elements, with arbitrary bytes (booleans are
/// 0 or 1: the typed encoding has no other values).
fn host_tensor() -> impl Strategy<Value = HostTensor> {
    (dtype(), prop::collection::vec(0..5i64, 0..4)).prop_flat_map(|(dtype, shape)| {
        let numel: i64 = shape.iter().product();
        let len = usize::try_from(numel).expect("small") * dtype.size();
        prop::collection::vec(any::<u8>(), len).prop_map(move |mut data| {
            if dtype == DType::Bool {
                data.iter_mut().for_each(|b| *b &= 1);
            }
            HostTensor {
                dtype,
                shape: shape.clone(),
                data: Bytes::from(data),
            }
        })
    })
}

fn spec_for(tensor: &HostTensor) -> TensorSpec {
    TensorSpec {
        name: "x".to_string(),
        dtype: tensor.dtype,
        shape: Some(
            (0..tensor.shape.len())
                .map(|i| if i == 0 { -1 } else { tensor.shape[i] })
                .collect(),
        ),
    }
}

fn shape(dims: &[i64]) -> Option<TensorShapeProto> {
    Some(TensorShapeProto {
        dim: dims
            .iter()
            .map(|&size| Dim {
                size,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    })
}

/// A request tensor of any dtype number and small shape, with values in any field.
fn tensor_proto() -> impl Strategy<Value = TensorProto> {
    (
        prop_oneof![
            (0..DType::ALL.len()).prop_map(|i| DType::ALL[i].tf_number()),
            0..30i32
        ],
        prop::option::of(prop::collection::vec(-2..6i64, 0..4)),
        prop::collection::vec(any::<u8>(), 0..48),
        prop::collection::vec(any::<f32>(), 0..6),
        prop::collection::vec(any::<i32>(), 0..6),
        prop::collection::vec(any::<i64>(), 0..3),
        prop::collection::vec(any::<bool>(), 0..6),
        prop::collection::vec(any::<i32>(), 0..3),
    )
        .prop_map(
            |(dtype, dims, content, float_val, int_val, int64_val, bool_val, half_val)| {
                TensorProto {
                    dtype,
                    tensor_shape: dims.as_deref().and_then(shape),
                    tensor_content: Bytes::from(content),
                    float_val,
                    int_val,
                    int64_val,
                    bool_val,
                    half_val,
                    ..TensorProto::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tensors_round_trip_through_both_encodings(tensor in host_tensor()) {
        let spec = spec_for(&tensor);
        for encoding in [OutputEncoding::Typed, OutputEncoding::TensorContent] {
            let proto = encode_output(&tensor, encoding);
            prop_assert_eq!(decode_input(&spec, &proto, usize::MAX), Ok(tensor.clone()), "{:?}", encoding);
        }
    }

    #[test]
    fn any_tensor_proto_is_decoded_or_refused_naming_the_input(
        proto in tensor_proto(), spec_dtype in dtype(), any_shape in any::<bool>()
    ) {
        let dims: Vec<i64> = proto
            .tensor_shape
            .iter()
            .flat_map(|s| s.dim.iter().map(|d| d.size))
            .collect();
        let spec = TensorSpec {
            name: "pixels".to_string(),
            dtype: spec_dtype,
            shape: (!any_shape)
                .then(|| dims.iter().enumerate().map(|(i, d)| if i == 0 { -1 } else { *d }).collect()),
        };
        match decode_input(&spec, &proto, usize::MAX) {
            Ok(tensor) => {
                prop_assert_eq!(tensor.dtype, spec_dtype);
                prop_assert_eq!(&tensor.shape, &dims);
                prop_assert_eq!(tensor.data.len(), tensor.numel() * spec_dtype.size());
            }
            Err(e) => prop_assert!(e.contains("'pixels'"), "{}", e),
        }
    }
}
