//! `scripts/make_python_model.py` writes a `torch.jit.script` model that LibTorch (tch)
//! loads and runs: the format users bring from Python.

use std::path::PathBuf;
use std::process::Command;

use aspire_core::SignatureMap;
use tch::{CModule, IValue, Tensor};

#[test]
fn python_scripted_model_loads_in_tch_and_computes_2x_plus_1_and_row_sums() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    if !python.exists() {
        eprintln!(
            "SKIPPED: {} is missing (run `make setup` to create the venv)",
            python.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(&python)
        .arg(root.join("scripts/make_python_model.py"))
        .arg(dir.path())
        .args(["--version", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make_python_model.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version_dir = dir.path().join("3");

    let json = std::fs::read(version_dir.join("signature.json")).unwrap();
    let map = SignatureMap::from_json(&json).unwrap();
    let (name, sig) = map.resolve("").unwrap();
    assert_eq!(name, "serving_default");
    let outputs: Vec<&str> = sig.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(outputs, ["y", "total"]);

    let model = CModule::load(version_dir.join("model.pt")).unwrap();
    let x = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 3.0, -4.0, 0.5, 10.0, 7.0]).view([2, 4]);
    let result = tch::no_grad(|| model.forward_is(&[IValue::Tensor(x)])).unwrap();
    let IValue::Tuple(parts) = result else {
        panic!("expected a tuple (y, total), got {result:?}");
    };
    let [IValue::Tensor(y), IValue::Tensor(total)] = parts.as_slice() else {
        panic!("expected two tensors, got {parts:?}");
    };
    assert_eq!(y.size(), [2, 4]);
    assert_eq!(
        Vec::<f32>::try_from(y.flatten(0, -1)).unwrap(),
        [1.0, 3.0, 5.0, 7.0, -7.0, 2.0, 21.0, 15.0]
    );
    assert_eq!(total.size(), [2, 1]);
    assert_eq!(
        Vec::<f32>::try_from(total.flatten(0, -1)).unwrap(),
        [6.0, 13.5]
    );
}
