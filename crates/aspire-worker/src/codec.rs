//! `TensorProto` to and from [`HostTensor`], checked against the signature.
//!
//! Requests may carry values either as little-endian bytes in `tensor_content` (taken
//! without copying) or in the typed repeated field of their dtype, as TensorFlow Serving
//! accepts them; a single typed value fills every element. Every error is a sentence that
//! names the input, what came and what was expected, for INVALID_ARGUMENT.

use aspire_core::{DType, TensorSpec};
use aspire_proto::tensorflow::tensor_shape_proto::Dim;
use aspire_proto::{DataType, TensorProto, TensorShapeProto};
use bytes::Bytes;

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

/// What one input of a request declares, checked against its signature before anything
/// proportional to it is allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// Its dtype.
    pub dtype: DType,
    /// Its shape, every size known.
    pub shape: Vec<i64>,
    /// Elements the shape holds.
    pub numel: usize,
    /// Bytes it takes once decoded (`numel` times the dtype's size): what a single
    /// broadcast value expands to, too.
    pub bytes: usize,
    /// Whether its values come in `tensor_content`, which decoding shares rather than copies.
    pub in_tensor_content: bool,
}

impl Declared {
    /// Rows along dimension 0; `None` for a scalar.
    pub fn rows(&self) -> Option<usize> {
        self.shape
            .first()
            .map(|d| usize::try_from(*d).unwrap_or(usize::MAX))
    }
}

/// Reads what input `spec.name` declares (dtype, shape, decoded size) and checks it
/// against `spec`, without touching its values. The error is a sentence for
/// INVALID_ARGUMENT.
pub fn declare(spec: &TensorSpec, proto: &TensorProto) -> Result<Declared, String> {
    let name = &spec.name;
    let dtype = DType::from_tf_number(proto.dtype).ok_or_else(|| {
        format!(
            "input '{name}' has dtype {}, which Aspire does not serve; the signature expects {}",
            tf_dtype_name(proto.dtype),
            spec.dtype
        )
    })?;
    let shape = decode_shape(name, proto.tensor_shape.as_ref())?;
    spec.check(dtype, &shape)?;
    let too_large = || format!("input '{name}' has shape {shape:?}, which is too large");
    let numel = checked_numel(&shape).ok_or_else(too_large)?;
    let bytes = numel.checked_mul(dtype.size()).ok_or_else(too_large)?;
    Ok(Declared {
        dtype,
        numel,
        bytes,
        in_tensor_content: !proto.tensor_content.is_empty(),
        shape,
    })
}

/// Decodes input `spec.name` from either encoding and checks its dtype, shape and content
/// length against `spec`. An input that would take more than `max_bytes` once decoded is
/// refused before anything is allocated for it. The error is a sentence naming the
/// tensor, what came and what was expected (INVALID_ARGUMENT).
pub fn decode_input(
    spec: &TensorSpec,
    proto: &TensorProto,
    max_bytes: usize,
) -> Result<HostTensor, String> {
    let declared = declare(spec, proto)?;
    if declared.bytes > max_bytes {
        return Err(format!(
            "input '{}' has shape {:?} of {}, {} bytes decoded; the limit is {max_bytes} bytes",
            spec.name, declared.shape, declared.dtype, declared.bytes
        ));
    }
    decode_declared(spec, proto, declared)
}

/// Decodes an input [`declare`] accepted; the caller has checked `declared.bytes`
/// against its limits.
pub fn decode_declared(
    spec: &TensorSpec,
    proto: &TensorProto,
    declared: Declared,
) -> Result<HostTensor, String> {
    let name = &spec.name;
    let Declared {
        dtype,
        shape,
        numel,
        bytes: needed_bytes,
        ..
    } = declared;
    let typed = typed_len(dtype, proto);
    let content = &proto.tensor_content;
    let data = if !content.is_empty() {
        if typed > 0 {
            return Err(format!(
                "input '{name}' has both tensor_content ({} bytes) and {typed} values in {}; send one of them",
                content.len(),
                typed_field(dtype)
            ));
        }
        if content.len() != needed_bytes {
            return Err(format!(
                "input '{name}': tensor_content has {} bytes; shape {shape:?} of {dtype} needs {needed_bytes}",
                content.len()
            ));
        }
        // LibTorch's bool is one byte holding 0 or 1; any other byte is undefined there.
        if dtype == DType::Bool
            && let Some(i) = content.iter().position(|b| *b > 1)
        {
            return Err(format!(
                "input '{name}': tensor_content byte {i} is {}; {dtype} values are the bytes 0 and 1",
                content[i]
            ));
        }
        // Bytes is reference-counted: the tensor shares the request's buffer.
        content.clone()
    } else if typed == numel || (typed == 1 && numel > 0) {
        decode_typed(name, dtype, proto, numel)?
    } else if typed == 0 {
        return Err(match misplaced_values(dtype, proto) {
            Some(field) => format!(
                "input '{name}' is {dtype} but its values are in {field}; {dtype} values go in {} or tensor_content",
                typed_field(dtype)
            ),
            None => format!(
                "input '{name}' has no values; shape {shape:?} of {dtype} needs {numel} values in {} or {needed_bytes} bytes in tensor_content",
                typed_field(dtype)
            ),
        });
    } else {
        return Err(format!(
            "input '{name}' has {typed} values in {}; shape {shape:?} needs {numel} (or 1 to fill every element)",
            typed_field(dtype)
        ));
    };
    Ok(HostTensor { dtype, shape, data })
}

/// Encodes an output tensor.
pub fn encode_output(tensor: &HostTensor, encoding: OutputEncoding) -> TensorProto {
    let mut proto = TensorProto {
        dtype: tensor.dtype.tf_number(),
        tensor_shape: Some(TensorShapeProto {
            dim: tensor
                .shape
                .iter()
                .map(|&size| Dim {
                    size,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        }),
        ..TensorProto::default()
    };
    if encoding == OutputEncoding::TensorContent {
        proto.tensor_content = tensor.data.clone();
        return proto;
    }
    let data: &[u8] = &tensor.data;
    match tensor.dtype {
        DType::F32 => proto.float_val = collect(data, f32::from_le_bytes),
        DType::F64 => proto.double_val = collect(data, f64::from_le_bytes),
        DType::I32 => proto.int_val = collect(data, i32::from_le_bytes),
        DType::I16 => proto.int_val = collect(data, |b| i32::from(i16::from_le_bytes(b))),
        DType::I8 => proto.int_val = collect(data, |b: [u8; 1]| i32::from(b[0] as i8)),
        DType::U8 => proto.int_val = collect(data, |b: [u8; 1]| i32::from(b[0])),
        DType::I64 => proto.int64_val = collect(data, i64::from_le_bytes),
        DType::Bool => proto.bool_val = collect(data, |b: [u8; 1]| b[0] != 0),
        // TensorFlow keeps half and bfloat16 as their 16-bit patterns in int32 slots.
        DType::F16 | DType::BF16 => {
            proto.half_val = collect(data, |b| i32::from(u16::from_le_bytes(b)));
        }
    }
    proto
}

/// The typed field that carries `dtype`'s values.
pub fn typed_field(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float_val",
        DType::F64 => "double_val",
        DType::I32 | DType::I16 | DType::I8 | DType::U8 => "int_val",
        DType::I64 => "int64_val",
        DType::Bool => "bool_val",
        DType::F16 | DType::BF16 => "half_val",
    }
}

fn typed_len(dtype: DType, proto: &TensorProto) -> usize {
    match dtype {
        DType::F32 => proto.float_val.len(),
        DType::F64 => proto.double_val.len(),
        DType::I32 | DType::I16 | DType::I8 | DType::U8 => proto.int_val.len(),
        DType::I64 => proto.int64_val.len(),
        DType::Bool => proto.bool_val.len(),
        DType::F16 | DType::BF16 => proto.half_val.len(),
    }
}

/// A non-empty typed field other than the one for `dtype`, which usually means the
/// client set the wrong dtype; naming it saves a round of guessing.
fn misplaced_values(dtype: DType, proto: &TensorProto) -> Option<&'static str> {
    let fields = [
        ("float_val", proto.float_val.len()),
        ("double_val", proto.double_val.len()),
        ("int_val", proto.int_val.len()),
        ("int64_val", proto.int64_val.len()),
        ("bool_val", proto.bool_val.len()),
        ("half_val", proto.half_val.len()),
        ("string_val", proto.string_val.len()),
        ("uint32_val", proto.uint32_val.len()),
        ("uint64_val", proto.uint64_val.len()),
    ];
    let own = typed_field(dtype);
    fields
        .into_iter()
        .find(|(field, len)| *field != own && *len > 0)
        .map(|(field, _)| field)
}

fn tf_dtype_name(number: i32) -> String {
    DataType::try_from(number).map_or_else(
        |_| format!("number {number}"),
        |d| d.as_str_name().to_string(),
    )
}

fn decode_shape(name: &str, shape: Option<&TensorShapeProto>) -> Result<Vec<i64>, String> {
    // TensorFlow reads a missing shape as a scalar.
    let Some(shape) = shape else {
        return Ok(Vec::new());
    };
    if shape.unknown_rank {
        return Err(format!(
            "input '{name}' has unknown_rank set; requests need a fully known shape"
        ));
    }
    let dims: Vec<i64> = shape.dim.iter().map(|d| d.size).collect();
    if dims.iter().any(|d| *d < 0) {
        return Err(format!(
            "input '{name}' has shape {dims:?}; request shapes need every size known (0 or more)"
        ));
    }
    Ok(dims)
}

fn checked_numel(shape: &[i64]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(usize::try_from(*d).ok()?))
}

fn decode_typed(
    name: &str,
    dtype: DType,
    proto: &TensorProto,
    numel: usize,
) -> Result<Bytes, String> {
    let bytes = match dtype {
        DType::F32 => fill(&proto.float_val, numel, f32::to_le_bytes),
        DType::F64 => fill(&proto.double_val, numel, f64::to_le_bytes),
        DType::I32 => fill(&proto.int_val, numel, i32::to_le_bytes),
        DType::I64 => fill(&proto.int64_val, numel, i64::to_le_bytes),
        DType::Bool => fill(&proto.bool_val, numel, |v| [u8::from(v)]),
        DType::I16 => {
            check_range(
                name,
                dtype,
                &proto.int_val,
                i16::MIN.into(),
                i16::MAX.into(),
            )?;
            fill(&proto.int_val, numel, |v| (v as i16).to_le_bytes())
        }
        DType::I8 => {
            check_range(name, dtype, &proto.int_val, i8::MIN.into(), i8::MAX.into())?;
            fill(&proto.int_val, numel, |v| (v as i8).to_le_bytes())
        }
        DType::U8 => {
            check_range(name, dtype, &proto.int_val, u8::MIN.into(), u8::MAX.into())?;
            fill(&proto.int_val, numel, |v| [v as u8])
        }
        // Only the low 16 bits of each slot hold the value, as in TensorFlow.
        DType::F16 | DType::BF16 => fill(&proto.half_val, numel, |v| (v as u16).to_le_bytes()),
    };
    Ok(Bytes::from(bytes))
}

fn check_range(name: &str, dtype: DType, values: &[i32], min: i32, max: i32) -> Result<(), String> {
    match values.iter().position(|v| !(min..=max).contains(v)) {
        None => Ok(()),
        Some(i) => Err(format!(
            "input '{name}': int_val[{i}] = {} is out of range for {dtype} ({min}..={max})",
            values[i]
        )),
    }
}

/// Little-endian bytes of `values`, or of `values[0]` repeated `numel` times when there
/// is one value. The buffer is allocated once at its final size.
fn fill<T: Copy, const N: usize>(
    values: &[T],
    numel: usize,
    enc: impl Fn(T) -> [u8; N],
) -> Vec<u8> {
    if values.len() == 1 && numel != 1 {
        return enc(values[0]).repeat(numel);
    }
    let mut out = vec![0u8; values.len() * N];
    for (dst, v) in out.chunks_exact_mut(N).zip(values) {
        dst.copy_from_slice(&enc(*v));
    }
    out
}

/// The values in little-endian `data`, in a vector of exactly the right capacity.
fn collect<T, const N: usize>(data: &[u8], dec: impl Fn([u8; N]) -> T) -> Vec<T> {
    let mut out = Vec::with_capacity(data.len() / N);
    out.extend(data.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        dec(a)
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_LIMIT: usize = usize::MAX;

    fn spec(name: &str, dtype: DType, shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.to_string(),
            dtype,
            shape: Some(shape.to_vec()),
        }
    }

    fn shape_proto(shape: &[i64]) -> Option<TensorShapeProto> {
        Some(TensorShapeProto {
            dim: shape
                .iter()
                .map(|&size| Dim {
                    size,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        })
    }

    fn float_proto(shape: &[i64], values: &[f32]) -> TensorProto {
        TensorProto {
            dtype: DType::F32.tf_number(),
            tensor_shape: shape_proto(shape),
            float_val: values.to_vec(),
            ..TensorProto::default()
        }
    }

    /// Six values of `dtype`, as bytes, with signs, fractions and extremes where the type
    /// has them.
    fn sample(dtype: DType) -> HostTensor {
        let data: Vec<u8> = match dtype {
            DType::F32 => [-1.5f32, 0.0, 3.25, f32::MAX, f32::MIN_POSITIVE, -0.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::F64 => [-1.5f64, 0.0, 3.25, f64::MAX, 1e-300, 7.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            // 1.0, -2.0, 0.5, 65504 (max), smallest subnormal, 0 as half; and the same
            // patterns read as bfloat16 are other valid numbers.
            DType::F16 | DType::BF16 => [0x3c00u16, 0xc000, 0x3800, 0x7bff, 0x0001, 0x0000]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::I8 => [-128i8, -1, 0, 1, 100, 127]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::I16 => [i16::MIN, -1, 0, 1, 300, i16::MAX]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::I32 => [i32::MIN, -1, 0, 1, 70000, i32::MAX]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::I64 => [i64::MIN, -1, 0, 1, 1 << 40, i64::MAX]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::U8 => vec![0, 1, 2, 128, 200, 255],
            DType::Bool => vec![1, 0, 0, 1, 1, 0],
        };
        HostTensor {
            dtype,
            shape: vec![2, 3],
            data: Bytes::from(data),
        }
    }

    #[test]
    fn every_dtype_round_trips_through_both_encodings() {
        for dtype in DType::ALL {
            let t = sample(dtype);
            let s = spec("x", dtype, &[-1, 3]);
            let typed = encode_output(&t, OutputEncoding::Typed);
            assert!(typed.tensor_content.is_empty(), "{dtype}");
            assert_eq!(typed_len(dtype, &typed), 6, "{dtype}");
            assert_eq!(
                decode_input(&s, &typed, NO_LIMIT).unwrap(),
                t,
                "{dtype} typed"
            );

            let content = encode_output(&t, OutputEncoding::TensorContent);
            assert_eq!(typed_len(dtype, &content), 0, "{dtype}");
            let back = decode_input(&s, &content, NO_LIMIT).unwrap();
            assert_eq!(back, t, "{dtype} tensor_content");
            // Zero copy both ways: response and decoded input share the tensor's buffer.
            assert_eq!(content.tensor_content.as_ptr(), t.data.as_ptr());
            assert_eq!(back.data.as_ptr(), t.data.as_ptr());
        }
    }

    #[test]
    fn typed_fields_hold_tensorflow_values() {
        let p = encode_output(&sample(DType::I8), OutputEncoding::Typed);
        assert_eq!(p.int_val, vec![-128, -1, 0, 1, 100, 127]);
        assert_eq!(p.dtype, 6);
        assert_eq!(
            p.tensor_shape
                .unwrap()
                .dim
                .iter()
                .map(|d| d.size)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        let p = encode_output(&sample(DType::U8), OutputEncoding::Typed);
        assert_eq!(p.int_val, vec![0, 1, 2, 128, 200, 255]);
        let p = encode_output(&sample(DType::F16), OutputEncoding::Typed);
        assert_eq!(p.half_val, vec![0x3c00, 0xc000, 0x3800, 0x7bff, 1, 0]);
        let p = encode_output(&sample(DType::Bool), OutputEncoding::Typed);
        assert_eq!(p.bool_val, vec![true, false, false, true, true, false]);
        let p = encode_output(
            &HostTensor::from_f32(vec![1, 2], &[0.5, -2.0]),
            OutputEncoding::Typed,
        );
        assert_eq!(p.float_val, vec![0.5, -2.0]);
    }

    #[test]
    fn half_val_keeps_the_low_16_bits() {
        let p = TensorProto {
            dtype: DType::F16.tf_number(),
            tensor_shape: shape_proto(&[1, 2]),
            half_val: vec![0x3c00, 0x7_3c00],
            ..TensorProto::default()
        };
        let t = decode_input(&spec("h", DType::F16, &[-1, 2]), &p, NO_LIMIT).unwrap();
        assert_eq!(&t.data[..], &[0x00, 0x3c, 0x00, 0x3c]);
    }

    #[test]
    fn one_typed_value_fills_every_element() {
        let t = decode_input(
            &spec("x", DType::F32, &[-1, 3]),
            &float_proto(&[2, 3], &[7.5]),
            NO_LIMIT,
        )
        .unwrap();
        assert_eq!(t.to_f32().unwrap(), vec![7.5; 6]);
        let p = TensorProto {
            dtype: DType::U8.tf_number(),
            tensor_shape: shape_proto(&[1, 4]),
            int_val: vec![9],
            ..TensorProto::default()
        };
        let t = decode_input(&spec("u", DType::U8, &[-1, 4]), &p, NO_LIMIT).unwrap();
        assert_eq!(&t.data[..], &[9, 9, 9, 9]);
    }

    #[test]
    fn empty_batch_decodes_to_no_bytes() {
        let t = decode_input(
            &spec("x", DType::F32, &[-1, 3]),
            &float_proto(&[0, 3], &[]),
            NO_LIMIT,
        )
        .unwrap();
        assert_eq!((t.shape, t.data.len()), (vec![0, 3], 0));
    }

    fn decode_err(s: &TensorSpec, p: &TensorProto) -> String {
        decode_input(s, p, NO_LIMIT).unwrap_err()
    }

    #[test]
    fn content_length_error_names_input_and_sizes() {
        let p = TensorProto {
            dtype: DType::F32.tf_number(),
            tensor_shape: shape_proto(&[1, 784]),
            tensor_content: Bytes::from(vec![0u8; 3132]),
            ..TensorProto::default()
        };
        assert_eq!(
            decode_err(&spec("images", DType::F32, &[-1, 784]), &p),
            "input 'images': tensor_content has 3132 bytes; shape [1, 784] of DT_FLOAT needs 3136"
        );
    }

    #[test]
    fn typed_count_error_names_input_and_counts() {
        let err = decode_err(
            &spec("images", DType::F32, &[-1, 4]),
            &float_proto(&[2, 4], &[1.0; 7]),
        );
        assert_eq!(
            err,
            "input 'images' has 7 values in float_val; shape [2, 4] needs 8 (or 1 to fill every element)"
        );
    }

    #[test]
    fn both_encodings_at_once_is_an_error() {
        let mut p = float_proto(&[1, 2], &[1.0, 2.0]);
        p.tensor_content = Bytes::from(vec![0u8; 8]);
        let err = decode_err(&spec("x", DType::F32, &[-1, 2]), &p);
        assert!(
            err.contains("'x'") && err.contains("8 bytes") && err.contains("2 values in float_val"),
            "{err}"
        );
    }

    #[test]
    fn no_values_error_says_what_is_needed() {
        let err = decode_err(&spec("x", DType::F32, &[-1, 2]), &float_proto(&[3, 2], &[]));
        assert_eq!(
            err,
            "input 'x' has no values; shape [3, 2] of DT_FLOAT needs 6 values in float_val or 24 bytes in tensor_content"
        );
        let p = TensorProto {
            dtype: DType::F32.tf_number(),
            tensor_shape: shape_proto(&[1, 2]),
            int_val: vec![1, 2],
            ..TensorProto::default()
        };
        let err = decode_err(&spec("x", DType::F32, &[-1, 2]), &p);
        assert_eq!(
            err,
            "input 'x' is DT_FLOAT but its values are in int_val; DT_FLOAT values go in float_val or tensor_content"
        );
    }

    #[test]
    fn dtype_errors_name_what_came_and_what_is_expected() {
        let mut p = float_proto(&[1, 2], &[1.0, 2.0]);
        p.dtype = DType::F64.tf_number();
        let err = decode_err(&spec("x", DType::F32, &[-1, 2]), &p);
        assert!(
            err.contains("'x'") && err.contains("DT_DOUBLE") && err.contains("DT_FLOAT"),
            "{err}"
        );
        p.dtype = 7;
        assert_eq!(
            decode_err(&spec("x", DType::F32, &[-1, 2]), &p),
            "input 'x' has dtype DT_STRING, which Aspire does not serve; the signature expects DT_FLOAT"
        );
        p.dtype = 999;
        assert!(decode_err(&spec("x", DType::F32, &[-1, 2]), &p).contains("number 999"));
        p.dtype = 0;
        assert!(decode_err(&spec("x", DType::F32, &[-1, 2]), &p).contains("DT_INVALID"));
    }

    #[test]
    fn shape_errors_name_the_input_and_shapes() {
        let s = spec("images", DType::F32, &[-1, 784]);
        assert_eq!(
            decode_err(&s, &float_proto(&[1, 783], &[0.0])),
            "input 'images' has shape [1, 783]; the signature expects [-1, 784]"
        );
        let err = decode_err(&s, &float_proto(&[-1, 784], &[0.0]));
        assert!(
            err.contains("'images'") && err.contains("[-1, 784]"),
            "{err}"
        );
        let mut p = float_proto(&[1, 784], &[0.0]);
        p.tensor_shape.as_mut().unwrap().unknown_rank = true;
        assert!(decode_err(&s, &p).contains("unknown_rank"));
        p.tensor_shape = None;
        assert!(decode_err(&s, &p).contains("'images' has shape []"));
        let huge = spec("h", DType::F32, &[-1, -1, -1]);
        let err = decode_err(&huge, &float_proto(&[1 << 40, 1 << 40, 1 << 40], &[0.0]));
        assert!(err.contains("'h'") && err.contains("too large"), "{err}");
    }

    #[test]
    fn int_val_is_range_checked_for_narrow_types() {
        for (dtype, bad, range) in [
            (DType::U8, 256, "0..=255"),
            (DType::U8, -1, "0..=255"),
            (DType::I8, 128, "-128..=127"),
            (DType::I16, -40000, "-32768..=32767"),
        ] {
            let p = TensorProto {
                dtype: dtype.tf_number(),
                tensor_shape: shape_proto(&[1, 3]),
                int_val: vec![1, 2, bad],
                ..TensorProto::default()
            };
            let err = decode_err(&spec("pixels", dtype, &[-1, 3]), &p);
            assert_eq!(
                err,
                format!("input 'pixels': int_val[2] = {bad} is out of range for {dtype} ({range})")
            );
        }
    }

    #[test]
    fn a_broadcast_to_a_huge_shape_is_refused_before_it_is_allocated() {
        // The 60-byte request that once made the server try to allocate 3.3 TB.
        let p = float_proto(&[1 << 30, 784], &[0.5]);
        let s = spec("images", DType::F32, &[-1, 784]);
        let d = declare(&s, &p).unwrap();
        assert_eq!(
            (d.bytes, d.rows(), d.in_tensor_content),
            (3_367_254_360_064, Some(1 << 30), false)
        );
        assert_eq!(
            decode_input(&s, &p, 256 << 20).unwrap_err(),
            "input 'images' has shape [1073741824, 784] of DT_FLOAT, 3367254360064 bytes decoded; the limit is 268435456 bytes"
        );
        // Every dtype counts at its decoded size.
        for dtype in DType::ALL {
            let p = TensorProto {
                dtype: dtype.tf_number(),
                tensor_shape: shape_proto(&[1 << 20, 1 << 10]),
                tensor_content: Bytes::from_static(&[0; 8]),
                ..TensorProto::default()
            };
            let s = spec("x", dtype, &[-1, -1]);
            let d = declare(&s, &p).unwrap();
            assert_eq!(d.bytes, (1 << 30) * dtype.size(), "{dtype}");
            assert!(d.in_tensor_content);
            let err = decode_input(&s, &p, (1 << 30) - 1).unwrap_err();
            assert!(
                err.contains("the limit is 1073741823 bytes"),
                "{dtype}: {err}"
            );
        }
        // At the limit it decodes.
        let t = decode_input(
            &spec("x", DType::F32, &[-1, 2]),
            &float_proto(&[2, 2], &[1.0]),
            16,
        )
        .unwrap();
        assert_eq!(t.to_f32().unwrap(), vec![1.0; 4]);
    }

    #[test]
    fn bool_content_other_than_0_and_1_is_refused() {
        let p = TensorProto {
            dtype: DType::Bool.tf_number(),
            tensor_shape: shape_proto(&[1, 3]),
            tensor_content: Bytes::from_static(&[1, 0, 2]),
            ..TensorProto::default()
        };
        assert_eq!(
            decode_input(&spec("b", DType::Bool, &[-1, 3]), &p, NO_LIMIT).unwrap_err(),
            "input 'b': tensor_content byte 2 is 2; DT_BOOL values are the bytes 0 and 1"
        );
    }
}
