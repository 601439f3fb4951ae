//! The messages of a run, built once: a `PredictRequest` of random float32 data in
//! `tensor_content`, encoded to bytes before the first call so each call only copies them
//! into its HTTP/2 frames; and the `PredictResponse` the bare server answers with.

use std::collections::HashMap;

use aspire_proto::serving::{ModelSpec, PredictRequest, PredictResponse};
use aspire_proto::tensorflow::tensor_shape_proto::Dim;
use aspire_proto::{DataType, TensorProto, TensorShapeProto};
use bytes::Bytes;
use prost::Message;

/// Parses a shape such as `1,784` (every dimension at least 1).
pub fn parse_shape(text: &str) -> Result<Vec<i64>, String> {
    let dims: Result<Vec<i64>, String> = text
        .split(',')
        .map(|d| {
            let d = d.trim();
            match d.parse::<i64>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(format!(
                    "{d:?} in shape {text:?} is not a positive integer; write e.g. 1,784"
                )),
            }
        })
        .collect();
    let dims = dims?;
    if dims.is_empty() {
        return Err("the shape is empty; write e.g. 1,784".to_string());
    }
    Ok(dims)
}

/// Elements in a tensor of `shape`.
pub fn numel(shape: &[i64]) -> usize {
    shape
        .iter()
        .map(|d| usize::try_from(*d).unwrap_or(0))
        .product()
}

/// `n` pseudo-random float32 values in [0, 1) (xorshift64*, seeded), as little-endian bytes.
/// Deterministic, so two runs send the same data.
pub fn random_f32_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(n * 4);
    for _ in 0..n {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        // The top 24 bits: exactly representable in an f32 mantissa.
        let v = (r >> 40) as f32 / (1u32 << 24) as f32;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// A float32 `TensorProto` of `shape` holding `content` (little-endian bytes).
pub fn float_tensor(shape: &[i64], content: Bytes) -> TensorProto {
    TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: Some(shape_proto(shape)),
        tensor_content: content,
        ..Default::default()
    }
}

fn shape_proto(shape: &[i64]) -> TensorShapeProto {
    TensorShapeProto {
        dim: shape
            .iter()
            .map(|&size| Dim {
                size,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    }
}

/// What one Predict call asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// `ModelSpec.name`.
    pub model: String,
    /// `ModelSpec.signature_name`.
    pub signature: String,
    /// `ModelSpec.version`; `None` lets the server pick.
    pub version: Option<i64>,
    /// The one input's name.
    pub input_name: String,
    /// The input's shape, batch dimension included (e.g. `[1, 784]`).
    pub shape: Vec<i64>,
}

impl RequestSpec {
    /// The request, with random float32 data in `tensor_content`.
    pub fn request(&self) -> PredictRequest {
        let data = random_f32_bytes(numel(&self.shape), 0x5eed);
        PredictRequest {
            model_spec: Some(ModelSpec {
                name: self.model.clone(),
                signature_name: self.signature.clone(),
                version_choice: self
                    .version
                    .map(aspire_proto::serving::model_spec::VersionChoice::Version),
            }),
            inputs: HashMap::from([(
                self.input_name.clone(),
                float_tensor(&self.shape, Bytes::from(data)),
            )]),
            output_filter: Vec::new(),
        }
    }

    /// The request, encoded once.
    pub fn encoded(&self) -> Bytes {
        Bytes::from(self.request().encode_to_vec())
    }
}

/// Checks an encoded `PredictResponse` answers something: it decodes and holds at least one
/// output. Returns `(name, elements)` of each output, sorted by name.
pub fn check_response(bytes: &[u8]) -> Result<Vec<(String, usize)>, String> {
    let response = PredictResponse::decode(bytes)
        .map_err(|e| format!("the answer is not a PredictResponse: {e}"))?;
    let mut outputs: Vec<(String, usize)> = response
        .outputs
        .iter()
        .map(|(name, t)| {
            let elements = if t.tensor_content.is_empty() {
                t.float_val.len()
                    + t.double_val.len()
                    + t.int_val.len()
                    + t.int64_val.len()
                    + t.half_val.len()
                    + t.bool_val.len()
            } else {
                t.tensor_content.len() / 4
            };
            (name.clone(), elements)
        })
        .collect();
    if outputs.is_empty() {
        return Err("the answer has no outputs".to_string());
    }
    outputs.sort();
    Ok(outputs)
}

/// How the bare server encodes its answer's output (the worker's `--output-encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputEncoding {
    /// `float_val`, as the worker answers by default.
    Typed,
    /// Little-endian bytes in `tensor_content`.
    TensorContent,
}

/// The `PredictResponse` of a model with one float32 output of `shape`, as the worker
/// would answer it for `model`/`signature` version 1.
pub fn response_like(
    model: &str,
    signature: &str,
    output_name: &str,
    shape: &[i64],
    encoding: OutputEncoding,
) -> PredictResponse {
    let n = numel(shape);
    let bytes = random_f32_bytes(n, 0xcafe);
    let tensor = match encoding {
        OutputEncoding::TensorContent => float_tensor(shape, Bytes::from(bytes)),
        OutputEncoding::Typed => TensorProto {
            dtype: DataType::DtFloat as i32,
            tensor_shape: Some(shape_proto(shape)),
            float_val: bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            ..Default::default()
        },
    };
    PredictResponse {
        model_spec: Some(ModelSpec {
            name: model.to_string(),
            signature_name: signature.to_string(),
            version_choice: Some(aspire_proto::serving::model_spec::VersionChoice::Version(1)),
        }),
        outputs: HashMap::from([(output_name.to_string(), tensor)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_refuse_nonsense() {
        assert_eq!(parse_shape("1,784").unwrap(), vec![1, 784]);
        assert_eq!(parse_shape(" 1, 3,224,224").unwrap(), vec![1, 3, 224, 224]);
        assert!(parse_shape("1,0").unwrap_err().contains("\"0\""));
        assert!(parse_shape("1,x").is_err());
        assert!(parse_shape("").is_err());
    }

    #[test]
    fn the_request_carries_the_input_as_content() {
        let spec = RequestSpec {
            model: "mnist".into(),
            signature: "predict_images".into(),
            version: Some(1),
            input_name: "images".into(),
            shape: vec![1, 784],
        };
        let back = PredictRequest::decode(spec.encoded()).unwrap();
        let t = &back.inputs["images"];
        assert_eq!(t.tensor_content.len(), 784 * 4);
        assert_eq!(t.dtype, DataType::DtFloat as i32);
        let spec_back = back.model_spec.unwrap();
        assert_eq!(spec_back.signature_name, "predict_images");
        let values: Vec<f32> = t
            .tensor_content
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        // Random, not constant.
        assert!(values.iter().any(|v| *v != values[0]));
    }

    #[test]
    fn responses_have_the_model_output_size_in_both_encodings() {
        for encoding in [OutputEncoding::Typed, OutputEncoding::TensorContent] {
            let r = response_like("m", "s", "scores", &[1, 10], encoding);
            let outputs = check_response(&r.encode_to_vec()).unwrap();
            assert_eq!(outputs, vec![("scores".to_string(), 10)]);
        }
        let typed = response_like("m", "s", "logits", &[1, 1000], OutputEncoding::Typed);
        let len = typed.encode_to_vec().len();
        assert!((4000..4100).contains(&len), "{len}");
    }

    #[test]
    fn an_empty_answer_is_refused() {
        let err = check_response(&PredictResponse::default().encode_to_vec()).unwrap_err();
        assert!(err.contains("no outputs"), "{err}");
    }
}
