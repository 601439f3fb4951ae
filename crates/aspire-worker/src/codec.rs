//! `TensorProto` to and from [`HostTensor`], checked against the signature.
//!
//! INTERFACE (filled in by the codec work; the rest of the worker codes against it).

use aspire_core::TensorSpec;
use aspire_proto::TensorProto;

use crate::tensor::HostTensor;

/// How outputs are encoded in responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputEncoding {
    /// Typed repeated fields (`float_val`, ...), as TF Serving answers by default.
    #[default]
    Typed,
    /// Little-endian bytes in `tensor_content` (cheaper for large outputs).
    TensorContent,
}

/// Decodes input `spec.name` from either encoding and checks its dtype, shape and content
/// length against `spec`. The error is a sentence naming the tensor, what came and what
/// was expected (INVALID_ARGUMENT).
pub fn decode_input(_spec: &TensorSpec, _proto: &TensorProto) -> Result<HostTensor, String> {
    unimplemented!("codec")
}

/// Encodes an output tensor.
pub fn encode_output(_tensor: &HostTensor, _encoding: OutputEncoding) -> TensorProto {
    unimplemented!("codec")
}
