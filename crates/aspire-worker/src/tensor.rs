//! [`HostTensor`]: a dense tensor as little-endian row-major bytes in host memory. It is
//! what the gRPC layer decodes requests into, what the batcher concatenates and splits,
//! and what the model runtime turns into LibTorch tensors, so no layer but [`crate::model`]
//! needs LibTorch.

use aspire_core::DType;
use bytes::Bytes;

/// A dense tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Element type.
    pub dtype: DType,
    /// Dimensions; all known (no -1).
    pub shape: Vec<i64>,
    /// `numel * dtype.size()` bytes, little-endian, row-major.
    pub data: Bytes,
}

impl HostTensor {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// Rows along dimension 0 (the batch dimension); 1 for a scalar.
    pub fn rows(&self) -> usize {
        self.shape
            .first()
            .map_or(1, |d| usize::try_from(*d).unwrap_or(0))
    }

    /// Bytes of one row (the product of dimensions 1.. times the element size).
    pub fn row_bytes(&self) -> usize {
        numel(self.shape.get(1..).unwrap_or(&[])) * self.dtype.size()
    }

    /// Rows `start..start + len` along dimension 0, sharing this tensor's bytes.
    pub fn slice_rows(&self, start: usize, len: usize) -> HostTensor {
        let rb = self.row_bytes();
        let mut shape = self.shape.clone();
        if let Some(d0) = shape.first_mut() {
            *d0 = i64::try_from(len).unwrap_or(i64::MAX);
        }
        HostTensor {
            dtype: self.dtype,
            shape,
            data: self.data.slice(start * rb..(start + len) * rb),
        }
    }

    /// A float32 tensor from values (tests and tools).
    pub fn from_f32(shape: Vec<i64>, values: &[f32]) -> HostTensor {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        HostTensor {
            dtype: DType::F32,
            shape,
            data: Bytes::from(data),
        }
    }

    /// The values of a float32 tensor (tests and tools); `None` for other dtypes.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }
}

/// Product of `shape`, treating negative sizes as 0.
pub fn numel(shape: &[i64]) -> usize {
    shape
        .iter()
        .map(|d| usize::try_from(*d).unwrap_or(0))
        .product()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_slices() {
        let t = HostTensor::from_f32(vec![3, 2], &[1., 2., 3., 4., 5., 6.]);
        assert_eq!((t.numel(), t.rows(), t.row_bytes()), (6, 3, 8));
        let s = t.slice_rows(1, 2);
        assert_eq!(s.shape, vec![2, 2]);
        assert_eq!(s.to_f32().unwrap(), vec![3., 4., 5., 6.]);
    }
}
