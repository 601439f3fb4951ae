//! The LibTorch runtime: loads TorchScript with `tch`, runs a signature's method on host
//! tensors, and warms a version up. The only serving module that imports `tch`.
//!
//! INTERFACE (filled in by the model-runtime work; the rest of the worker codes against it).

use std::path::Path;
use std::sync::Arc;

use aspire_core::{Signature, SignatureMap};

use crate::tensor::HostTensor;

/// Where models run: `auto` (CUDA when LibTorch sees a GPU), `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA device 0 when available, else CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: use auto, cpu, cuda or cuda:N")),
        }
    }
}

/// A loaded model version that can run its signatures. Implemented by [`TorchModel`], and
/// by fakes in the batcher's tests.
pub trait Servable: Send + Sync + 'static {
    /// Runs `signature` on `inputs` (one per signature input, in the signature's order,
    /// all with the same number of rows) and returns one tensor per signature output, in
    /// the signature's order, each with the same number of rows as the inputs.
    /// Runs on the calling thread (a batch thread), under `no_grad`.
    fn run(&self, signature: &Signature, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, String>;
}

/// A TorchScript module on a device.
pub struct TorchModel {
    _private: (),
}

impl TorchModel {
    /// Loads `model.pt` from `dir` onto `device` and checks it against `signatures` by
    /// warming every signature up at each of `warmup_batch_sizes` (zeros as inputs; a
    /// signature whose input shapes are not fully known past dimension 0 is not warmed up).
    /// Any failure (missing or corrupt file, a method that does not exist, outputs whose
    /// count, dtype or shape differ from the signature) is an error sentence.
    pub fn load(
        _dir: &Path,
        _device: DeviceSpec,
        _signatures: &SignatureMap,
        _warmup_batch_sizes: &[usize],
    ) -> Result<Arc<Self>, String> {
        unimplemented!("model runtime")
    }

    /// The device it runs on, e.g. `cpu` or `cuda:0`.
    pub fn device_name(&self) -> String {
        unimplemented!("model runtime")
    }
}

impl Servable for TorchModel {
    fn run(&self, _signature: &Signature, _inputs: &[HostTensor]) -> Result<Vec<HostTensor>, String> {
        unimplemented!("model runtime")
    }
}

/// Sets LibTorch's intra-op and inter-op thread counts once per process; `None` sizes
/// them to the CPUs this process may use.
pub fn configure_threads(_intra_op: Option<usize>, _inter_op: Option<usize>) {
    unimplemented!("model runtime")
}

/// The device `auto` resolves to on this machine.
pub fn resolve_device(_spec: DeviceSpec) -> Result<String, String> {
    unimplemented!("model runtime")
}
