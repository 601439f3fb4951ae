//! The model runtime against real LibTorch and real TorchScript files: modules scripted
//! by the venv's PyTorch (the files users bring) and one traced from Rust with `tch`.
//! Expected numbers are computed here in Rust, not by the model.
//!
//! `ASPIRE_TEST_DEVICE` (default `cpu`; e.g. `cuda:0`) picks where the models run, and
//! `ASPIRE_TEST_PYTHON` a Python with torch 2.11.0 other than the workspace's `.venv`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use aspire_core::{DType, SignatureMap};
use aspire_worker::model::{
    DeviceSpec, Servable, TorchModel, configure_threads, resolve_device,
    set_graph_executor_optimize,
};
use aspire_worker::tensor::HostTensor;
use bytes::Bytes;
use tempfile::TempDir;

/// TorchScript modules scripted by PyTorch, one directory (with `model.pt`) each.
const MODULES_PY: &str = r#"
import os, sys, torch
from typing import Dict, List

class Pair(torch.nn.Module):
    def forward(self, x):
        return x * 2 + 1, x.sum(1)

class Named(torch.nn.Module):
    def forward(self, x) -> Dict[str, torch.Tensor]:
        return {"doubled": x * 2 + 1, "total": x.sum(1)}

class Listed(torch.nn.Module):
    def forward(self, x) -> List[torch.Tensor]:
        return [x + 1, x - 1]

class TwoInputs(torch.nn.Module):
    def forward(self, a, b):
        return a * b - b

    @torch.jit.export
    def scale(self, x):
        return x * 10

class Identity(torch.nn.Module):
    def forward(self, x):
        return x.clone()

class Doubler(torch.nn.Module):
    def forward(self, x):
        return x + x

class DropsRows(torch.nn.Module):
    def forward(self, x):
        return x.sum(0, keepdim=True)

for name, module in [("pair", Pair()), ("named", Named()), ("listed", Listed()),
                     ("two_inputs", TwoInputs()), ("identity", Identity()), ("doubler", Doubler()),
                     ("drops_rows", DropsRows())]:
    d = os.path.join(sys.argv[1], name)
    os.makedirs(d)
    torch.jit.script(module).save(os.path.join(d, "model.pt"))
"#;

/// Sets LibTorch to one thread (2 cores, tests in parallel) and scripts the modules once
/// per test binary.
fn modules() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        configure_threads(Some(1), Some(1));
        let python = std::env::var_os("ASPIRE_TEST_PYTHON").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"),
            PathBuf::from,
        );
        assert!(
            python.exists(),
            "{} is missing: run `make setup` to make the venv",
            python.display()
        );
        let dir = TempDir::new().unwrap();
        let started = Instant::now();
        // torch.jit.script reads the module's source, so it must come from a file.
        let script = dir.path().join("modules.py");
        std::fs::write(&script, MODULES_PY).unwrap();
        let out = Command::new(&python)
            .arg(&script)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripting failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("scripted the test modules in {:?}", started.elapsed());
        dir
    })
    .path()
}

fn device() -> DeviceSpec {
    std::env::var("ASPIRE_TEST_DEVICE").map_or(DeviceSpec::Cpu, |d| d.parse().unwrap())
}

fn module(name: &str) -> PathBuf {
    modules().join(name)
}

fn sigs(json: &str) -> SignatureMap {
    SignatureMap::from_json(json.as_bytes()).unwrap()
}

/// One float input `x` of shape [-1, 3] and the given outputs, as `signature.json` text.
fn x3_sig(method: &str, outputs: &str) -> SignatureMap {
    sigs(&format!(
        r#"{{"signatures": {{"predict": {{"method": "{method}",
            "inputs": [{{"name": "x", "dtype": "float32", "shape": [-1, 3]}}],
            "outputs": [{outputs}]}}}}}}"#
    ))
}

const DOUBLED_AND_TOTAL: &str = r#"{"name": "doubled", "dtype": "float32", "shape": [-1, 3]},
                                   {"name": "total", "dtype": "float32", "shape": [-1]}"#;

fn load(
    name: &str,
    signatures: &SignatureMap,
    warmup: &[usize],
) -> Result<Arc<TorchModel>, String> {
    TorchModel::load(&module(name), device(), signatures, warmup)
}

const ROWS: [[f32; 3]; 3] = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-1.0, 0.0, 0.5]];

fn three_rows() -> HostTensor {
    HostTensor::from_f32(vec![3, 3], ROWS.as_flattened())
}

fn doubled() -> Vec<f32> {
    ROWS.as_flattened().iter().map(|v| v * 2.0 + 1.0).collect()
}

fn totals() -> Vec<f32> {
    ROWS.iter().map(|r| r.iter().sum()).collect()
}

#[test]
fn tuple_outputs_are_taken_by_position() {
    let signatures = x3_sig("forward", DOUBLED_AND_TOTAL);
    let model = load("pair", &signatures, &[1, 2]).unwrap();
    assert_eq!(model.device_name(), resolve_device(device()).unwrap());
    let out = model
        .run(&signatures.signatures["predict"], &[three_rows()])
        .unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(
        (out[0].shape.clone(), out[1].shape.clone()),
        (vec![3, 3], vec![3])
    );
    assert_eq!(out[0].to_f32().unwrap(), doubled());
    assert_eq!(out[1].to_f32().unwrap(), totals());
}

#[test]
fn dict_outputs_are_taken_by_name() {
    // Listed in the other order than the module builds its dict.
    let signatures = x3_sig(
        "forward",
        r#"{"name": "total", "dtype": "float32", "shape": [-1]},
           {"name": "doubled", "dtype": "float32", "shape": [-1, 3]}"#,
    );
    let model = load("named", &signatures, &[1]).unwrap();
    let out = model
        .run(&signatures.signatures["predict"], &[three_rows()])
        .unwrap();
    assert_eq!(out[0].to_f32().unwrap(), totals());
    assert_eq!(out[1].to_f32().unwrap(), doubled());

    let missing = x3_sig(
        "forward",
        r#"{"name": "sum", "dtype": "float32", "shape": [-1]}"#,
    );
    let err = load("named", &missing, &[1]).unwrap_err();
    assert!(
        err.contains("'sum'") && err.contains("doubled") && err.contains("total"),
        "{err}"
    );
}

#[test]
fn list_outputs_are_taken_by_position() {
    let signatures = x3_sig(
        "forward",
        r#"{"name": "up", "dtype": "float32", "shape": [-1, 3]},
           {"name": "down", "dtype": "float32", "shape": [-1, 3]}"#,
    );
    let model = load("listed", &signatures, &[2]).unwrap();
    let out = model
        .run(&signatures.signatures["predict"], &[three_rows()])
        .unwrap();
    let x = ROWS.as_flattened();
    assert_eq!(
        out[0].to_f32().unwrap(),
        x.iter().map(|v| v + 1.0).collect::<Vec<_>>()
    );
    assert_eq!(
        out[1].to_f32().unwrap(),
        x.iter().map(|v| v - 1.0).collect::<Vec<_>>()
    );
}

#[test]
fn two_inputs_and_an_exported_method() {
    let signatures = sigs(
        r#"{"signatures": {
            "combine": {"inputs": [{"name": "a", "dtype": "float32", "shape": [-1, 2]},
                                   {"name": "b", "dtype": "float32", "shape": [-1, 2]}],
                        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}]},
            "scale": {"method": "scale",
                      "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, -1]}],
                      "outputs": [{"name": "y", "dtype": "float32"}]}}}"#,
    );
    let model = load("two_inputs", &signatures, &[1, 4]).unwrap();
    let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = [0.5, -1.0, 2.0, 0.0, 10.0, 3.0];
    let out = model
        .run(
            &signatures.signatures["combine"],
            &[
                HostTensor::from_f32(vec![3, 2], &a),
                HostTensor::from_f32(vec![3, 2], &b),
            ],
        )
        .unwrap();
    let expected: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a * b - b).collect();
    assert_eq!(out[0].to_f32().unwrap(), expected);

    let out = model
        .run(
            &signatures.signatures["scale"],
            &[HostTensor::from_f32(vec![2, 1], &[1.5, -2.0])],
        )
        .unwrap();
    assert_eq!(
        (out[0].shape.clone(), out[0].to_f32().unwrap()),
        (vec![2, 1], vec![15.0, -20.0])
    );
}

fn le<T: Copy, const N: usize>(values: &[T], to_bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|v| to_bytes(*v)).collect()
}

/// Six values of `dtype` as bytes, and the bytes of each value added to itself, worked
/// out here per type: a wrong dtype mapping (half read as bfloat16, say) changes the sum.
fn sample_and_doubled(dtype: DType) -> (Vec<u8>, Vec<u8>) {
    let ints: [i64; 6] = [1, -2, 3, 100, -7, 0];
    match dtype {
        DType::F32 => {
            let v = ints.map(|i| i as f32 + 0.25);
            (
                le(&v, f32::to_le_bytes),
                le(&v.map(|x| x + x), f32::to_le_bytes),
            )
        }
        DType::F64 => {
            let v = ints.map(|i| i as f64 - 0.125);
            (
                le(&v, f64::to_le_bytes),
                le(&v.map(|x| x + x), f64::to_le_bytes),
            )
        }
        // As half: 1.0, -2.0, 0.5, 3.0, 1.875, 0; doubling adds one to the exponent.
        DType::F16 => (
            le(
                &[0x3c00u16, 0xc000, 0x3800, 0x4200, 0x3f80, 0],
                u16::to_le_bytes,
            ),
            le(
                &[0x4000u16, 0xc400, 0x3c00, 0x4600, 0x4380, 0],
                u16::to_le_bytes,
            ),
        ),
        // The same bits as bfloat16: 2^-7, -2.0, 2^-15, 32.0, 1.0, 0.
        DType::BF16 => (
            le(
                &[0x3c00u16, 0xc000, 0x3800, 0x4200, 0x3f80, 0],
                u16::to_le_bytes,
            ),
            le(
                &[0x3c80u16, 0xc080, 0x3880, 0x4280, 0x4000, 0],
                u16::to_le_bytes,
            ),
        ),
        DType::I8 => {
            let v = ints.map(|i| i as i8);
            (
                le(&v, i8::to_le_bytes),
                le(&v.map(|x| x.wrapping_add(x)), i8::to_le_bytes),
            )
        }
        DType::I16 => {
            let v = ints.map(|i| i as i16 * 300);
            (
                le(&v, i16::to_le_bytes),
                le(&v.map(|x| x.wrapping_add(x)), i16::to_le_bytes),
            )
        }
        DType::I32 => {
            let v = ints.map(|i| i as i32 * 70_000);
            (
                le(&v, i32::to_le_bytes),
                le(&v.map(|x| x.wrapping_add(x)), i32::to_le_bytes),
            )
        }
        DType::I64 => {
            let v = ints.map(|i| i << 40);
            (
                le(&v, i64::to_le_bytes),
                le(&v.map(|x| x.wrapping_add(x)), i64::to_le_bytes),
            )
        }
        DType::U8 => {
            let v = [0u8, 1, 2, 128, 200, 255];
            (v.to_vec(), v.map(|x| x.wrapping_add(x)).to_vec())
        }
        // bool + bool is a logical or in PyTorch.
        DType::Bool => (vec![1, 0, 0, 1, 1, 0], vec![1, 0, 0, 1, 1, 0]),
    }
}

#[test]
fn every_dtype_reaches_libtorch_as_its_own_type() {
    let entries: Vec<String> = DType::ALL
        .iter()
        .map(|d| {
            format!(
                r#""{0}": {{"inputs": [{{"name": "x", "dtype": "{0}", "shape": [-1, 2]}}],
                           "outputs": [{{"name": "y", "dtype": "{0}", "shape": [-1, 2]}}]}}"#,
                d.short_name()
            )
        })
        .collect();
    let signatures = sigs(&format!(r#"{{"signatures": {{{}}}}}"#, entries.join(",")));
    let model = load("doubler", &signatures, &[1, 3]).unwrap();
    for dtype in DType::ALL {
        let (input, doubled) = sample_and_doubled(dtype);
        let input = HostTensor {
            dtype,
            shape: vec![3, 2],
            data: Bytes::from(input),
        };
        let out = model
            .run(&signatures.signatures[dtype.short_name()], &[input])
            .unwrap();
        let want = HostTensor {
            dtype,
            shape: vec![3, 2],
            data: Bytes::from(doubled),
        };
        assert_eq!(out, vec![want], "{dtype}");
    }
}

#[test]
fn module_traced_in_rust_matches_its_weights() {
    use tch::nn::{self, Module};
    configure_threads(Some(1), Some(1));
    let dir = TempDir::new().unwrap();
    let mut vs = nn::VarStore::new(tch::Device::Cpu);
    let linear = nn::linear(vs.root(), 4, 2, Default::default());
    vs.freeze();
    let example = tch::Tensor::zeros([1, 4], (tch::Kind::Float, tch::Device::Cpu));
    let traced = tch::CModule::create_by_tracing("Linear", "forward", &[example], &mut |xs| {
        vec![linear.forward(&xs[0])]
    })
    .unwrap();
    traced.save(dir.path().join("model.pt")).unwrap();
    let mut w = vec![0f32; 8];
    linear.ws.copy_data(&mut w, 8);
    let mut b = vec![0f32; 2];
    linear.bs.as_ref().unwrap().copy_data(&mut b, 2);

    let signatures = sigs(
        r#"{"signatures": {"serving_default": {
            "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}]}}}"#,
    );
    let model = TorchModel::load(dir.path(), device(), &signatures, &[1, 3]).unwrap();
    let x = [
        1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0,
    ];
    let out = model
        .run(
            &signatures.signatures["serving_default"],
            &[HostTensor::from_f32(vec![3, 4], &x)],
        )
        .unwrap();
    assert_eq!(out[0].shape, vec![3, 2]);
    let got = out[0].to_f32().unwrap();
    for row in 0..3 {
        for o in 0..2 {
            let want: f32 = b[o] + (0..4).map(|i| w[o * 4 + i] * x[row * 4 + i]).sum::<f32>();
            assert!(
                (got[row * 2 + o] - want).abs() < 1e-5,
                "row {row} out {o}: {} vs {want}",
                got[row * 2 + o]
            );
        }
    }
}

#[test]
fn corrupt_model_pt_is_an_error_naming_the_file() {
    configure_threads(Some(1), Some(1));
    let dir = TempDir::new().unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect();
    for contents in [noise, Vec::new(), b"PK\x03\x04 not really a zip".to_vec()] {
        std::fs::write(dir.path().join("model.pt"), &contents).unwrap();
        let err = TorchModel::load(
            dir.path(),
            device(),
            &SignatureMap::default_for_untyped_model(),
            &[1],
        )
        .unwrap_err();
        assert!(err.starts_with("model.pt: cannot load"), "{err}");
        assert!(
            !err.contains("frame #"),
            "the C++ stack trace should be cut: {err}"
        );
    }
}

#[test]
fn missing_model_pt_is_an_error() {
    let dir = TempDir::new().unwrap();
    let err = TorchModel::load(
        dir.path(),
        device(),
        &SignatureMap::default_for_untyped_model(),
        &[1],
    )
    .unwrap_err();
    assert!(
        err.contains("model.pt") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn output_dtype_mismatch_names_the_output() {
    let signatures = x3_sig(
        "forward",
        r#"{"name": "doubled", "dtype": "float64", "shape": [-1, 3]},
           {"name": "total", "dtype": "float32", "shape": [-1]}"#,
    );
    let err = load("pair", &signatures, &[2]).unwrap_err();
    assert_eq!(
        err,
        "model.pt, signature 'predict': warm-up at batch size 2: output 'doubled' has dtype DT_FLOAT; the signature expects DT_DOUBLE"
    );
}

#[test]
fn output_shape_mismatch_names_the_output() {
    let signatures = x3_sig(
        "forward",
        r#"{"name": "doubled", "dtype": "float32", "shape": [-1, 3]},
           {"name": "total", "dtype": "float32", "shape": [-1, 1]}"#,
    );
    let err = load("pair", &signatures, &[1]).unwrap_err();
    assert!(
        err.contains("output 'total' has shape [1]; the signature expects [-1, 1]"),
        "{err}"
    );
}

#[test]
fn output_count_mismatch_is_an_error() {
    let signatures = x3_sig(
        "forward",
        r#"{"name": "doubled", "dtype": "float32", "shape": [-1, 3]}"#,
    );
    let err = load("pair", &signatures, &[1]).unwrap_err();
    assert!(
        err.contains("returned 2 values; the signature has 1 outputs ('doubled')"),
        "{err}"
    );
}

#[test]
fn missing_method_is_an_error_with_or_without_warm_up() {
    let known = x3_sig("nope", DOUBLED_AND_TOTAL);
    let err = load("pair", &known, &[1]).unwrap_err();
    assert_eq!(
        err,
        "model.pt, signature 'predict': the module has no method 'nope'"
    );
    // Shapes not known past dimension 0: no warm-up, the method is still looked up.
    let unknown = sigs(
        r#"{"signatures": {"predict": {"method": "nope",
            "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, -1]}],
            "outputs": [{"name": "y", "dtype": "float32"}]}}}"#,
    );
    let err = load("pair", &unknown, &[1]).unwrap_err();
    assert_eq!(
        err,
        "model.pt, signature 'predict': the module has no method 'nope'"
    );
    let err = load("pair", &known, &[]).unwrap_err();
    assert!(err.contains("no method 'nope'"), "{err}");
    // At run time too (a signature the version was not loaded with).
    let model = load("pair", &x3_sig("forward", DOUBLED_AND_TOTAL), &[]).unwrap();
    let err = model
        .run(&known.signatures["predict"], &[three_rows()])
        .unwrap_err();
    assert_eq!(err, "the module has no method 'nope'");
    // An existing method passes that check without running.
    let scale = sigs(
        r#"{"signatures": {"s": {"method": "scale",
            "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, -1]}],
            "outputs": [{"name": "y", "dtype": "float32"}]}}}"#,
    );
    load("two_inputs", &scale, &[1]).unwrap();
}

#[test]
fn a_model_that_drops_rows_is_caught() {
    let signatures = x3_sig(
        "forward",
        r#"{"name": "y", "dtype": "float32", "shape": [-1, 3]}"#,
    );
    // At batch size 1 one row out is right, so this warm-up passes...
    let model = load("drops_rows", &signatures, &[1]).unwrap();
    let err = model
        .run(&signatures.signatures["predict"], &[three_rows()])
        .unwrap_err();
    assert!(
        err.contains("output 'y' has shape [1, 3]; it needs 3 rows"),
        "{err}"
    );
    // ...and warming up at more sizes finds it at load.
    let err = load("drops_rows", &signatures, &[1, 4]).unwrap_err();
    assert!(
        err.contains("batch size 4") && err.contains("needs 4 rows"),
        "{err}"
    );
}

#[test]
fn a_failing_model_is_an_error_not_a_panic() {
    let signatures = sigs(
        r#"{"signatures": {"combine": {
            "inputs": [{"name": "a", "dtype": "float32", "shape": [-1, -1]},
                       {"name": "b", "dtype": "float32", "shape": [-1, -1]}],
            "outputs": [{"name": "y", "dtype": "float32"}]}}}"#,
    );
    let model = load("two_inputs", &signatures, &[1]).unwrap();
    let sig = &signatures.signatures["combine"];
    let err = model
        .run(
            sig,
            &[
                HostTensor::from_f32(vec![1, 2], &[1.0, 2.0]),
                HostTensor::from_f32(vec![1, 3], &[1.0, 2.0, 3.0]),
            ],
        )
        .unwrap_err();
    assert_eq!(
        err,
        "method 'forward' failed: RuntimeError: The size of tensor a (2) must match the size of tensor b (3) at non-singleton dimension 1"
    );
    assert!(!err.contains('\n') && !err.contains("frame #"), "{err}");
    // Inputs whose bytes disagree with their shape never reach LibTorch.
    let short = HostTensor {
        dtype: DType::F32,
        shape: vec![1, 2],
        data: Bytes::from_static(&[0; 4]),
    };
    let err = model.run(sig, &[short.clone(), short]).unwrap_err();
    assert_eq!(
        err,
        "input 'a' has 4 bytes; shape [1, 2] of DT_FLOAT needs 8"
    );
    let one = HostTensor::from_f32(vec![1, 2], &[1.0, 2.0]);
    let two = HostTensor::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let err = model.run(sig, &[one.clone(), two]).unwrap_err();
    assert_eq!(
        err,
        "input 'b' has 2 rows and input 'a' has 1; all inputs need the same number of rows"
    );
    let ints = HostTensor {
        dtype: DType::I32,
        ..one.clone()
    };
    let err = model.run(sig, &[one, ints]).unwrap_err();
    assert_eq!(
        err,
        "input 'b' has dtype DT_INT32; the signature expects DT_FLOAT"
    );
    let err = model
        .run(sig, &[HostTensor::from_f32(vec![1, 1], &[1.0])])
        .unwrap_err();
    assert!(err.contains("2 inputs; 1 were given"), "{err}");
}

#[test]
fn the_untyped_default_signature_runs_any_shape() {
    let signatures = SignatureMap::default_for_untyped_model();
    let model = load("identity", &signatures, &[1, 8]).unwrap();
    let sig = &signatures.signatures["serving_default"];
    let x: Vec<f32> = (0..24).map(|i| i as f32 / 4.0).collect();
    let out = model
        .run(sig, &[HostTensor::from_f32(vec![2, 3, 4], &x)])
        .unwrap();
    assert_eq!(
        (out[0].shape.clone(), out[0].to_f32().unwrap()),
        (vec![2, 3, 4], x)
    );
}

#[test]
fn threads_share_one_model() {
    let signatures = x3_sig("forward", DOUBLED_AND_TOTAL);
    let model = load("pair", &signatures, &[1]).unwrap();
    let sig = &signatures.signatures["predict"];
    std::thread::scope(|s| {
        for t in 0..4 {
            let model = &model;
            s.spawn(move || {
                for i in 0..50 {
                    let rows = 1 + (t + i) % 5;
                    let x: Vec<f32> = (0..rows * 3).map(|k| (k + t * 100 + i) as f32).collect();
                    let out = model
                        .run(sig, &[HostTensor::from_f32(vec![rows as i64, 3], &x)])
                        .unwrap();
                    let want: Vec<f32> = x.iter().map(|v| v * 2.0 + 1.0).collect();
                    assert_eq!(out[0].to_f32().unwrap(), want);
                    assert_eq!(out[1].shape, vec![rows as i64]);
                }
            });
        }
    });
}

#[test]
fn configure_threads_sizes_libtorch_for_every_thread() {
    modules();
    configure_threads(Some(2), Some(2)); // later calls change nothing
    assert_eq!(tch::get_num_threads(), 1);
    assert_eq!(std::thread::spawn(tch::get_num_threads).join().unwrap(), 1);
    assert_eq!(tch::get_num_interop_threads(), 1);
}

#[test]
fn runs_with_graph_executor_optimizations_off() {
    let signatures = x3_sig("forward", DOUBLED_AND_TOTAL);
    let model = load("pair", &signatures, &[1]).unwrap();
    set_graph_executor_optimize(false);
    let out =
        std::thread::spawn(move || model.run(&signatures.signatures["predict"], &[three_rows()]))
            .join()
            .unwrap()
            .unwrap();
    set_graph_executor_optimize(true);
    assert_eq!(out[0].to_f32().unwrap(), doubled());
    assert_eq!(out[1].to_f32().unwrap(), totals());
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    if tch::Cuda::is_available() {
        return;
    }
    let err = TorchModel::load(
        &module("pair"),
        DeviceSpec::Cuda(0),
        &SignatureMap::default_for_untyped_model(),
        &[],
    )
    .unwrap_err();
    assert!(
        err.contains("cuda:0") && err.contains("no CUDA device"),
        "{err}"
    );
}
