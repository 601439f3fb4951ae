//! Conversions from Aspire's own types (`aspire-core`) to TensorFlow Serving's messages,
//! shared by every role that answers the public API (worker, router), so they describe a
//! model the same way.

use std::collections::HashMap;

use aspire_core::signature::PREDICT_METHOD_NAME;
use aspire_core::{SignatureMap, TensorSpec};

use crate::TensorShapeProto;
use crate::serving::SignatureDefMap;
use crate::tensorflow::{SignatureDef, TensorInfo, tensor_info, tensor_shape_proto};

/// TensorFlow's `SignatureDefMap` for a version's signatures.
pub fn signature_def_map(signatures: &SignatureMap) -> SignatureDefMap {
    SignatureDefMap {
        signature_def: signatures
            .signatures
            .iter()
            .map(|(name, sig)| {
                let def = SignatureDef {
                    inputs: sig
                        .inputs
                        .iter()
                        .map(|t| (t.name.clone(), tensor_info(t)))
                        .collect(),
                    outputs: sig
                        .outputs
                        .iter()
                        .map(|t| (t.name.clone(), tensor_info(t)))
                        .collect(),
                    method_name: PREDICT_METHOD_NAME.to_string(),
                    defaults: HashMap::new(),
                };
                (name.clone(), def)
            })
            .collect(),
    }
}

fn tensor_info(t: &TensorSpec) -> TensorInfo {
    TensorInfo {
        encoding: Some(tensor_info::Encoding::Name(t.name.clone())),
        dtype: t.dtype.tf_number(),
        tensor_shape: Some(match &t.shape {
            Some(dims) => TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|d| tensor_shape_proto::Dim {
                        size: *d,
                        name: String::new(),
                    })
                    .collect(),
                unknown_rank: false,
            },
            // No shape in the signature accepts any rank, which TensorFlow spells this way.
            None => TensorShapeProto {
                dim: vec![],
                unknown_rank: true,
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_def_map_carries_names_dtypes_and_shapes() {
        let sigs = SignatureMap::from_json(
            br#"{"signatures": {"predict_images": {
                "inputs": [{"name": "images", "dtype": "float32", "shape": [-1, 784]}],
                "outputs": [{"name": "scores", "dtype": "float32", "shape": [-1, 10]}]}}}"#,
        )
        .unwrap();
        let map = signature_def_map(&sigs);
        let def = &map.signature_def["predict_images"];
        let input = &def.inputs["images"];
        assert_eq!(input.dtype, 1);
        let dims: Vec<i64> = input
            .tensor_shape
            .as_ref()
            .unwrap()
            .dim
            .iter()
            .map(|d| d.size)
            .collect();
        assert_eq!(dims, vec![-1, 784]);
        assert_eq!(def.outputs["scores"].dtype, 1);
        assert_eq!(def.method_name, "tensorflow/serving/predict");
    }

    #[test]
    fn untyped_signature_has_unknown_rank() {
        let map = signature_def_map(&SignatureMap::default_for_untyped_model());
        let shape = map.signature_def["serving_default"].inputs["input"]
            .tensor_shape
            .clone()
            .unwrap();
        assert!(shape.unknown_rank && shape.dim.is_empty());
    }
}
