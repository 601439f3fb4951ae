//! Tensor element types, with TensorFlow's `DataType` numbers and names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The element types Aspire serves. Each maps to one TensorFlow `DataType` and one
/// LibTorch scalar type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DType {
    /// 32-bit float (`DT_FLOAT`).
    F32,
    /// 64-bit float (`DT_DOUBLE`).
    F64,
    /// 16-bit IEEE float (`DT_HALF`).
    F16,
    /// bfloat16 (`DT_BFLOAT16`).
    BF16,
    /// 8-bit signed integer (`DT_INT8`).
    I8,
    /// 16-bit signed integer (`DT_INT16`).
    I16,
    /// 32-bit signed integer (`DT_INT32`).
    I32,
    /// 64-bit signed integer (`DT_INT64`).
    I64,
    /// 8-bit unsigned integer (`DT_UINT8`).
    U8,
    /// Boolean, one byte (`DT_BOOL`).
    Bool,
}

impl DType {
    /// Every type, for tests and messages.
    pub const ALL: [DType; 10] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::Bool,
    ];

    /// TensorFlow's `DataType` number.
    pub fn tf_number(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::F64 => 2,
            DType::I32 => 3,
            DType::U8 => 4,
            DType::I16 => 5,
            DType::I8 => 6,
            DType::I64 => 9,
            DType::Bool => 10,
            DType::BF16 => 14,
            DType::F16 => 19,
        }
    }

    /// The type with TensorFlow `DataType` number `n`, if Aspire serves it.
    pub fn from_tf_number(n: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.tf_number() == n)
    }

    /// TensorFlow's name, e.g. `DT_FLOAT`.
    pub fn tf_name(self) -> &'static str {
        match self {
            DType::F32 => "DT_FLOAT",
            DType::F64 => "DT_DOUBLE",
            DType::F16 => "DT_HALF",
            DType::BF16 => "DT_BFLOAT16",
            DType::I8 => "DT_INT8",
            DType::I16 => "DT_INT16",
            DType::I32 => "DT_INT32",
            DType::I64 => "DT_INT64",
            DType::U8 => "DT_UINT8",
            DType::Bool => "DT_BOOL",
        }
    }

    /// The short name used in `signature.json`, e.g. `float32`.
    pub fn short_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// Bytes per element in `tensor_content` (little-endian).
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.tf_name())
    }
}

/// A type name that is not one Aspire serves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown dtype {0:?}: use one of float32, float64, float16, bfloat16, int8, int16, int32, int64, uint8, bool (or DT_FLOAT, ...)"
)]
pub struct UnknownDType(pub String);

impl FromStr for DType {
    type Err = UnknownDType;
    /// Accepts the short names (`float32`, also `float`, `double`, `half`) and TensorFlow's
    /// (`DT_FLOAT`), case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        let found = match lower.as_str() {
            "float" | "double" => Some(if lower == "float" {
                DType::F32
            } else {
                DType::F64
            }),
            "half" => Some(DType::F16),
            _ => Self::ALL
                .into_iter()
                .find(|d| d.short_name() == lower || d.tf_name().eq_ignore_ascii_case(&lower)),
        };
        found.ok_or_else(|| UnknownDType(s.to_string()))
    }
}

impl TryFrom<String> for DType {
    type Error = UnknownDType;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DType> for String {
    fn from(d: DType) -> String {
        d.short_name().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_tensorflow() {
        assert_eq!(DType::F32.tf_number(), 1);
        assert_eq!(DType::F64.tf_number(), 2);
        assert_eq!(DType::I32.tf_number(), 3);
        assert_eq!(DType::U8.tf_number(), 4);
        assert_eq!(DType::I64.tf_number(), 9);
        assert_eq!(DType::Bool.tf_number(), 10);
        assert_eq!(DType::BF16.tf_number(), 14);
        assert_eq!(DType::F16.tf_number(), 19);
        for d in DType::ALL {
            assert_eq!(DType::from_tf_number(d.tf_number()), Some(d));
            assert_eq!(d.short_name().parse::<DType>().unwrap(), d);
            assert_eq!(d.tf_name().parse::<DType>().unwrap(), d);
        }
        assert_eq!(DType::from_tf_number(7), None); // DT_STRING
        assert!("complex64".parse::<DType>().is_err());
    }
}
