//! The LibTorch runtime: loads TorchScript with `tch`, runs a signature's method on host
//! tensors, and warms a version up. The only serving module that imports `tch`.
//!
//! Every LibTorch call goes through `tch`'s fallible (`f_`) functions, and the few that
//! can still panic run inside `catch_unwind`, so a bad file or a failing model is an error
//! sentence, never a crashed worker.

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use aspire_core::{DType, Signature, SignatureMap, TensorSpec};
use bytes::Bytes;
use tch::{CModule, Device, IValue, Kind, Tensor};

use crate::tensor::HostTensor;

/// The file a version directory must hold.
pub const MODEL_FILE: &str = "model.pt";

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
///
/// `tch::CModule` is `Send + Sync`, and LibTorch allows concurrent calls of a loaded
/// module's methods (the graph executor locks its own compilation), so batch threads call
/// [`Servable::run`] at the same time without a lock of ours.
pub struct TorchModel {
    module: CModule,
    device: Device,
}

impl std::fmt::Debug for TorchModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchModel")
            .field("device", &self.device_name())
            .finish_non_exhaustive()
    }
}

impl TorchModel {
    /// Loads `model.pt` from `dir` onto `device` and checks it against `signatures` by
    /// warming every signature up at each of `warmup_batch_sizes` (zeros as inputs; a
    /// signature whose input shapes are not fully known past dimension 0 is not warmed up).
    /// Any failure (missing or corrupt file, a method that does not exist, outputs whose
    /// count, dtype or shape differ from the signature) is an error sentence.
    pub fn load(
        dir: &Path,
        device: DeviceSpec,
        signatures: &SignatureMap,
        warmup_batch_sizes: &[usize],
    ) -> Result<Arc<Self>, String> {
        let device = tch_device(device)?;
        let path = dir.join(MODEL_FILE);
        if !path.is_file() {
            return Err(format!("{MODEL_FILE}: not found in {}", dir.display()));
        }
        let mut module = guarded(|| CModule::load_on_device(&path, device))
            .and_then(|r| r.map_err(|e| torch_message(&e)))
            .map_err(|e| format!("{MODEL_FILE}: cannot load {}: {e}", path.display()))?;
        guarded(|| module.f_set_eval())
            .and_then(|r| r.map_err(|e| torch_message(&e)))
            .map_err(|e| format!("{MODEL_FILE}: cannot switch to eval mode: {e}"))?;
        let model = Arc::new(Self { module, device });
        for (name, sig) in &signatures.signatures {
            model
                .warm_up(sig, warmup_batch_sizes)
                .map_err(|e| format!("{MODEL_FILE}, signature '{name}': {e}"))?;
        }
        Ok(model)
    }

    /// The device it runs on, e.g. `cpu` or `cuda:0`.
    pub fn device_name(&self) -> String {
        device_name(self.device)
    }

    fn warm_up(&self, sig: &Signature, batch_sizes: &[usize]) -> Result<(), String> {
        self.check_method_exists(&sig.method)?;
        for &batch in batch_sizes {
            let rows =
                i64::try_from(batch).map_err(|_| format!("batch size {batch} is too large"))?;
            let Some(inputs) = zero_inputs(&sig.inputs, rows) else {
                break;
            };
            self.run(sig, &inputs)
                .map_err(|e| format!("warm-up at batch size {batch}: {e}"))?;
        }
        Ok(())
    }

    /// Finds a misspelt method, also in a signature that cannot be warmed up. A call with
    /// no arguments fails LibTorch's argument check before anything runs, and its message
    /// tells a missing method apart from a missing argument.
    fn check_method_exists(&self, method: &str) -> Result<(), String> {
        let no_args: &[IValue] = &[];
        let outcome = guarded(|| {
            tch::no_grad(|| {
                apply_graph_executor_optimize();
                self.module.method_is(method, no_args)
            })
        });
        match outcome {
            Ok(Err(e))
                if e.to_string()
                    .contains(&format!("Method '{method}' is not defined")) =>
            {
                Err(format!("the module has no method '{method}'"))
            }
            _ => Ok(()),
        }
    }

    fn run_unguarded(
        &self,
        sig: &Signature,
        inputs: &[HostTensor],
    ) -> Result<Vec<HostTensor>, String> {
        if inputs.len() != sig.inputs.len() {
            return Err(format!(
                "the signature has {} inputs; {} were given",
                sig.inputs.len(),
                inputs.len()
            ));
        }
        let rows = inputs.first().map_or(0, HostTensor::rows);
        let mut args = Vec::with_capacity(inputs.len());
        for (spec, t) in sig.inputs.iter().zip(inputs) {
            spec.check(t.dtype, &t.shape)?;
            if t.rows() != rows {
                return Err(format!(
                    "input '{}' has {} rows and input '{}' has {rows}; all inputs need the same number of rows",
                    spec.name,
                    t.rows(),
                    sig.inputs[0].name
                ));
            }
            let tensor =
                to_torch(t, self.device).map_err(|e| format!("input '{}' {e}", spec.name))?;
            args.push(IValue::Tensor(tensor));
        }
        let result = tch::no_grad(|| {
            apply_graph_executor_optimize();
            if sig.method == "forward" {
                self.module.forward_is(&args)
            } else {
                self.module.method_is(&sig.method, &args)
            }
        })
        .map_err(|e| method_error(&sig.method, &e))?;
        // The inputs' memory can go before the outputs are copied out.
        drop(args);
        let outputs = match_outputs(&sig.outputs, &sig.method, result)?;
        sig.outputs
            .iter()
            .zip(outputs)
            .map(|(spec, t)| to_host(spec, &t, rows))
            .collect()
    }
}

impl Servable for TorchModel {
    fn run(&self, signature: &Signature, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, String> {
        guarded(|| self.run_unguarded(signature, inputs)).and_then(|r| r)
    }
}

/// Sets LibTorch's intra-op and inter-op thread counts once per process; `None` sizes
/// them to the CPUs this process may use.
///
/// Later calls do nothing: LibTorch refuses to change the inter-op pool once it has run.
pub fn configure_threads(intra_op: Option<usize>, inter_op: Option<usize>) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // available_parallelism honours cgroup quotas and affinity; LibTorch's own
        // default counts every core of the host, which oversubscribes a container.
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let clamp = |n: usize| i32::try_from(n.max(1)).unwrap_or(i32::MAX);
        let (intra, inter) = (
            clamp(intra_op.unwrap_or(cpus)),
            clamp(inter_op.unwrap_or(cpus)),
        );
        if tch::get_num_interop_threads() != inter
            && guarded(|| tch::set_num_interop_threads(inter)).is_err()
        {
            tracing::warn!(
                inter_op = inter,
                "LibTorch's inter-op thread pool was already in use; its size stays {}",
                tch::get_num_interop_threads()
            );
        }
        if let Err(e) = guarded(|| tch::set_num_threads(intra)) {
            tracing::warn!(
                intra_op = intra,
                "cannot set LibTorch's intra-op threads: {e}"
            );
        }
        tracing::info!(
            intra_op = intra,
            inter_op = inter,
            "LibTorch threads configured"
        );
    });
}

/// The device `auto` resolves to on this machine.
pub fn resolve_device(spec: DeviceSpec) -> Result<String, String> {
    tch_device(spec).map(device_name)
}

static GRAPH_EXECUTOR_OPTIMIZE: AtomicBool = AtomicBool::new(true);

thread_local! {
    static APPLIED_OPTIMIZE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Turns TorchScript's graph-executor optimizations (profiling runs, re-specialization
/// for new input shapes, fusion) on or off for every module run from now on. Off removes
/// the optimization stalls of first calls and new batch sizes and gives up fusion (which
/// matters mostly on GPUs). On by default, as in LibTorch.
pub fn set_graph_executor_optimize(optimize: bool) {
    GRAPH_EXECUTOR_OPTIMIZE.store(optimize, Ordering::Relaxed);
}

/// Whether graph-executor optimizations are on (see [`set_graph_executor_optimize`]).
pub fn graph_executor_optimize() -> bool {
    GRAPH_EXECUTOR_OPTIMIZE.load(Ordering::Relaxed)
}

/// LibTorch keeps the optimize switch per thread, so each thread that runs a module copies
/// the process-wide setting into its own before a call (once per change).
fn apply_graph_executor_optimize() {
    let wanted = graph_executor_optimize();
    APPLIED_OPTIMIZE.with(|applied| {
        if applied.get() != Some(wanted) && tch::jit::f_set_graph_executor_optimize(wanted).is_ok()
        {
            applied.set(Some(wanted));
        }
    });
}

fn tch_device(spec: DeviceSpec) -> Result<Device, String> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => Ok(if tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        DeviceSpec::Cuda(n) => {
            let count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
            if n < count {
                Ok(Device::Cuda(n))
            } else if count == 0 {
                Err(format!(
                    "device cuda:{n} was asked for, but LibTorch sees no CUDA device here; use --device cpu or auto"
                ))
            } else {
                Err(format!(
                    "device cuda:{n} was asked for, but LibTorch sees only {count} CUDA device(s) (cuda:0..cuda:{})",
                    count - 1
                ))
            }
        }
    }
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Mps => "mps".to_string(),
        Device::Vulkan => "vulkan".to_string(),
        Device::Cpu => "cpu".to_string(),
    }
}

/// The LibTorch kind of each dtype Aspire serves.
fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I8 => Kind::Int8,
        DType::I16 => Kind::Int16,
        DType::I32 => Kind::Int,
        DType::I64 => Kind::Int64,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

/// The dtype of a LibTorch kind, if Aspire serves it.
fn dtype_of(kind: Kind) -> Option<DType> {
    DType::ALL.into_iter().find(|d| kind_of(*d) == kind)
}

/// Zero-filled inputs with `rows` rows, or `None` if some input's shape is not known
/// past dimension 0. All-zero bytes are a valid value of every dtype.
fn zero_inputs(specs: &[TensorSpec], rows: i64) -> Option<Vec<HostTensor>> {
    specs
        .iter()
        .map(|s| {
            let shape = s.concrete_shape(rows)?;
            let len = crate::tensor::numel(&shape) * s.dtype.size();
            Some(HostTensor {
                dtype: s.dtype,
                shape,
                data: Bytes::from(vec![0u8; len]),
            })
        })
        .collect()
}

fn to_torch(t: &HostTensor, device: Device) -> Result<Tensor, String> {
    let needed = t.numel() * t.dtype.size();
    // LibTorch reads exactly `needed` bytes; a short buffer would be read past its end.
    if t.data.len() != needed || t.shape.iter().any(|d| *d < 0) {
        return Err(format!(
            "has {} bytes; shape {:?} of {} needs {needed}",
            t.data.len(),
            t.shape,
            t.dtype
        ));
    }
    let cpu = Tensor::f_from_data_size(&t.data, &t.shape, kind_of(t.dtype))
        .map_err(|e| format!("cannot become a LibTorch tensor: {}", torch_message(&e)))?;
    if device == Device::Cpu {
        return Ok(cpu);
    }
    cpu.f_to_device(device).map_err(|e| {
        format!(
            "cannot be copied to {}: {}",
            device_name(device),
            torch_message(&e)
        )
    })
}

/// Picks the signature's outputs out of what the method returned: a tensor, a tuple or
/// list by position, or a string-keyed dict by name.
fn match_outputs(
    specs: &[TensorSpec],
    method: &str,
    result: IValue,
) -> Result<Vec<Tensor>, String> {
    let by_position = |items: Vec<IValue>| -> Result<Vec<Tensor>, String> {
        if items.len() != specs.len() {
            return Err(format!(
                "method '{method}' returned {} values; the signature has {} outputs ({})",
                items.len(),
                specs.len(),
                names(specs)
            ));
        }
        items
            .into_iter()
            .zip(specs)
            .map(|(v, spec)| match v {
                IValue::Tensor(t) => Ok(t),
                other => Err(format!(
                    "output '{}' is a {}, not a tensor",
                    spec.name,
                    ivalue_kind(&other)
                )),
            })
            .collect()
    };
    match result {
        IValue::Tensor(t) => by_position(vec![IValue::Tensor(t)]),
        IValue::Tuple(items) | IValue::GenericList(items) => by_position(items),
        IValue::TensorList(ts) => by_position(ts.into_iter().map(IValue::Tensor).collect()),
        IValue::GenericDict(entries) => {
            let mut entries: Vec<(String, IValue)> = entries
                .into_iter()
                .map(|(k, v)| match k {
                    IValue::String(k) => Ok((k, v)),
                    other => Err(format!(
                        "method '{method}' returned a dict with {} keys; outputs need string keys",
                        ivalue_kind(&other)
                    )),
                })
                .collect::<Result<_, _>>()?;
            specs
                .iter()
                .map(|spec| {
                    let Some(i) = entries.iter().position(|(k, _)| *k == spec.name) else {
                        let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
                        return Err(format!(
                            "output '{}' is not in the dict method '{method}' returned (keys: {})",
                            spec.name,
                            keys.join(", ")
                        ));
                    };
                    match entries.swap_remove(i).1 {
                        IValue::Tensor(t) => Ok(t),
                        other => Err(format!(
                            "output '{}' is a {}, not a tensor",
                            spec.name,
                            ivalue_kind(&other)
                        )),
                    }
                })
                .collect()
        }
        other => Err(format!(
            "method '{method}' returned a {}; outputs ({}) must come as a tensor, a tuple or list of tensors, or a dict of tensors",
            ivalue_kind(&other),
            names(specs)
        )),
    }
}

/// Checks one output against its spec and copies it to host bytes (one copy, from the
/// device if it is elsewhere).
fn to_host(spec: &TensorSpec, t: &Tensor, rows: usize) -> Result<HostTensor, String> {
    let name = &spec.name;
    let kind = t
        .f_kind()
        .map_err(|e| format!("output '{name}': {}", torch_message(&e)))?;
    let dtype = dtype_of(kind).ok_or_else(|| {
        format!("output '{name}' has LibTorch type {kind:?}, which Aspire does not serve; the signature expects {}", spec.dtype)
    })?;
    if dtype != spec.dtype {
        return Err(format!(
            "output '{name}' has dtype {dtype}; the signature expects {}",
            spec.dtype
        ));
    }
    let shape = t.size();
    if let Some(expected) = &spec.shape {
        let matches = expected.len() == shape.len()
            && expected.iter().zip(&shape).all(|(e, s)| *e == -1 || e == s);
        if !matches {
            return Err(format!(
                "output '{name}' has shape {shape:?}; the signature expects {expected:?}"
            ));
        }
    }
    let out_rows = shape.first().and_then(|d| usize::try_from(*d).ok());
    if out_rows != Some(rows) {
        return Err(format!(
            "output '{name}' has shape {shape:?}; it needs {rows} rows along dimension 0, one per input row"
        ));
    }
    let numel = crate::tensor::numel(&shape);
    let mut data = vec![0u8; numel * dtype.size()];
    t.f_copy_data_u8(&mut data, numel).map_err(|e| {
        format!(
            "output '{name}': cannot copy to the host: {}",
            torch_message(&e)
        )
    })?;
    Ok(HostTensor {
        dtype,
        shape,
        data: Bytes::from(data),
    })
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| format!("'{}'", s.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tensor(_) => "tensor",
        IValue::Double(_) => "float",
        IValue::Int(_) => "int",
        IValue::Bool(_) => "bool",
        IValue::Tuple(_) => "tuple",
        IValue::IntList(_)
        | IValue::DoubleList(_)
        | IValue::BoolList(_)
        | IValue::GenericList(_) => "list",
        IValue::String(_) => "string",
        IValue::StringList(_) => "list of strings",
        IValue::TensorList(_) => "list of tensors",
        IValue::GenericDict(_) => "dict",
        IValue::Object(_) => "object",
        IValue::Device(_) => "device",
        _ => "value of another type",
    }
}

/// A failed call as one sentence. TorchScript puts two tracebacks before the exception;
/// the log keeps them and the caller gets the exception itself (`RuntimeError: ...`).
fn method_error(method: &str, e: &tch::TchError) -> String {
    let text = raw_message(e);
    if text.contains(&format!("Method '{method}' is not defined")) {
        return format!("the module has no method '{method}'");
    }
    let exception = match text.find("Traceback of TorchScript") {
        Some(start) => {
            tracing::debug!(method, error = %one_line(&text), "TorchScript method failed");
            // The exception follows the last `<--- HERE` marker.
            text[start..]
                .rsplit_once("<--- HERE")
                .map_or(&text[start..], |(_, rest)| rest)
        }
        None => text.as_str(),
    };
    format!("method '{method}' failed: {}", one_line(exception))
}

/// LibTorch's message on one line, without the C++ stack trace it may append.
fn torch_message(e: &tch::TchError) -> String {
    one_line(&raw_message(e))
}

fn raw_message(e: &tch::TchError) -> String {
    match e {
        tch::TchError::Torch(msg) => msg.clone(),
        other => other.to_string(),
    }
}

fn one_line(text: &str) -> String {
    let mut lines = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("Exception raised from") || line.starts_with("frame #") {
            break;
        }
        if !line.is_empty() {
            lines.push(line);
        }
    }
    lines.join(" ")
}

/// Runs `f`, turning a panic inside `tch` (its infallible wrappers unwrap LibTorch
/// errors) into an error sentence.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f))
        .map_err(|p| format!("LibTorch failed: {}", panic_message(p.as_ref())))
}

fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_has_a_kind_and_back() {
        for d in DType::ALL {
            assert_eq!(dtype_of(kind_of(d)), Some(d));
            assert_eq!(kind_of(d).elt_size_in_bytes(), d.size(), "{d}");
        }
        assert_eq!(dtype_of(Kind::ComplexFloat), None);
    }

    #[test]
    fn devices_parse_and_resolve() {
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert!("gpu".parse::<DeviceSpec>().unwrap_err().contains("cuda:N"));
        assert_eq!(resolve_device(DeviceSpec::Cpu).unwrap(), "cpu");
        let auto = resolve_device(DeviceSpec::Auto).unwrap();
        assert_eq!(auto == "cuda:0", tch::Cuda::is_available());
        let err = resolve_device(DeviceSpec::Cuda(99)).unwrap_err();
        assert!(err.contains("cuda:99"), "{err}");
    }
}
