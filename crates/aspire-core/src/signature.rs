//! Signatures: the named inputs and outputs a model version serves, read from the
//! optional `signature.json` beside `model.pt`.
//!
//! ```json
//! {
//!   "signatures": {
//!     "predict_images": {
//!       "method": "forward",
//!       "inputs":  [{"name": "images", "dtype": "float32", "shape": [-1, 784]}],
//!       "outputs": [{"name": "scores", "dtype": "float32", "shape": [-1, 10]}]
//!     }
//!   }
//! }
//! ```
//!
//! `inputs` are the TorchScript method's positional arguments, in order. `outputs` name
//! what it returns: one tensor for one output, a tuple or list by position, or a
//! `Dict[str, Tensor]` by name. Dimension 0 of every input and output is the batch
//! dimension and must be `-1`; `-1` elsewhere means any size. `shape` may be left out
//! (any rank). Without `signature.json` a version has one signature, `serving_default`,
//! with input `input` and output `output`, both float32 of any shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dtype::DType;

/// Name TensorFlow Serving uses when a request names no signature.
pub const DEFAULT_SIGNATURE: &str = "serving_default";

/// TensorFlow's method name for predict signatures, reported in `SignatureDef.method_name`.
pub const PREDICT_METHOD_NAME: &str = "tensorflow/serving/predict";

/// One named input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// Name clients use in `PredictRequest.inputs` / `PredictResponse.outputs`.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions; -1 is any size. `None` accepts any rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Vec<i64>>,
}

impl TensorSpec {
    /// Checks a tensor's dtype and shape against this spec; the error is a sentence that
    /// names the tensor, what came and what was expected.
    pub fn check(&self, dtype: DType, shape: &[i64]) -> Result<(), String> {
        if dtype != self.dtype {
            return Err(format!(
                "input '{}' has dtype {}; the signature expects {}",
                self.name, dtype, self.dtype
            ));
        }
        let Some(expected) = &self.shape else {
            if shape.is_empty() {
                return Err(format!(
                    "input '{}' is a scalar; it needs at least one (batch) dimension",
                    self.name
                ));
            }
            return Ok(());
        };
        let matches = expected.len() == shape.len()
            && expected.iter().zip(shape).all(|(e, s)| *e == -1 || e == s);
        if matches {
            Ok(())
        } else {
            Err(format!(
                "input '{}' has shape {:?}; the signature expects {:?}",
                self.name, shape, expected
            ))
        }
    }

    /// The shape with dimension 0 set to `batch`, if every other dimension is known.
    pub fn concrete_shape(&self, batch: i64) -> Option<Vec<i64>> {
        let shape = self.shape.as_ref()?;
        let mut out = Vec::with_capacity(shape.len());
        for (i, d) in shape.iter().enumerate() {
            match (i, *d) {
                (0, _) => out.push(batch),
                (_, -1) => return None,
                (_, d) => out.push(d),
            }
        }
        Some(out)
    }
}

/// One signature: which method to call and its named inputs and outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The TorchScript method to call.
    #[serde(default = "default_method")]
    pub method: String,
    /// The method's arguments, in order.
    pub inputs: Vec<TensorSpec>,
    /// What the method returns (see the module docs).
    pub outputs: Vec<TensorSpec>,
}

fn default_method() -> String {
    "forward".to_string()
}

impl Signature {
    /// The input named `name`.
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.name == name)
    }

    /// The output named `name`.
    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|t| t.name == name)
    }

    fn validate(&self, sig_name: &str) -> Result<(), String> {
        if self.method.is_empty() {
            return Err(format!("signature '{sig_name}': method is empty"));
        }
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return Err(format!(
                "signature '{sig_name}' needs at least one input and one output"
            ));
        }
        for (kind, list) in [("input", &self.inputs), ("output", &self.outputs)] {
            let mut seen = std::collections::BTreeSet::new();
            for t in list {
                if t.name.is_empty() || !seen.insert(t.name.as_str()) {
                    return Err(format!(
                        "signature '{sig_name}': {kind} names must be non-empty and unique ({:?})",
                        t.name
                    ));
                }
                if let Some(shape) = &t.shape {
                    if shape.first() != Some(&-1) {
                        return Err(format!(
                            "signature '{sig_name}': {kind} '{}' has shape {shape:?}; dimension 0 is the batch dimension and must be -1",
                            t.name
                        ));
                    }
                    if shape.iter().any(|d| *d < -1 || *d == 0) {
                        return Err(format!(
                            "signature '{sig_name}': {kind} '{}' has shape {shape:?}; sizes are positive or -1",
                            t.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// All signatures of one model version.
///
/// Deserializing checks every signature, wherever the JSON comes from: `signature.json`
/// in storage or a registry value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedSignatureMap")]
pub struct SignatureMap {
    /// Signature name to signature.
    pub signatures: BTreeMap<String, Signature>,
}

/// A [`SignatureMap`] as read, before its checks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UncheckedSignatureMap {
    signatures: BTreeMap<String, Signature>,
}

impl TryFrom<UncheckedSignatureMap> for SignatureMap {
    type Error = String;
    fn try_from(raw: UncheckedSignatureMap) -> Result<Self, String> {
        if raw.signatures.is_empty() {
            return Err("\"signatures\" is empty".to_string());
        }
        for (name, sig) in &raw.signatures {
            // An empty name cannot be asked for: a request without one means the default.
            if name.is_empty() {
                return Err(
                    "a signature has an empty name; name it, e.g. \"serving_default\"".to_string(),
                );
            }
            sig.validate(name)?;
        }
        Ok(Self {
            signatures: raw.signatures,
        })
    }
}

impl SignatureMap {
    /// Parses and checks the contents of `signature.json`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("signature.json: {e}"))
    }

    /// The signature used when a version has no `signature.json`.
    pub fn default_for_untyped_model() -> Self {
        let spec = |name: &str| TensorSpec {
            name: name.to_string(),
            dtype: DType::F32,
            shape: None,
        };
        let sig = Signature {
            method: default_method(),
            inputs: vec![spec("input")],
            outputs: vec![spec("output")],
        };
        Self {
            signatures: BTreeMap::from([(DEFAULT_SIGNATURE.to_string(), sig)]),
        }
    }

    /// Resolves a request's `signature_name`: an empty name means `serving_default`, or
    /// the only signature when there is just one. Returns the resolved name and signature,
    /// or an error sentence listing the names that exist.
    pub fn resolve(&self, requested: &str) -> Result<(&str, &Signature), String> {
        let wanted = if requested.is_empty() {
            if self.signatures.len() == 1 && !self.signatures.contains_key(DEFAULT_SIGNATURE) {
                self.signatures
                    .keys()
                    .next()
                    .map(String::as_str)
                    .unwrap_or(DEFAULT_SIGNATURE)
            } else {
                DEFAULT_SIGNATURE
            }
        } else {
            requested
        };
        self.signatures
            .get_key_value(wanted)
            .map(|(k, v)| (k.as_str(), v))
            .ok_or_else(|| {
                let names: Vec<&str> = self.signatures.keys().map(String::as_str).collect();
                format!(
                    "signature '{wanted}' not found; this model has: {}",
                    names.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MNIST: &str = r#"{"signatures": {"predict_images": {
        "inputs": [{"name": "images", "dtype": "float32", "shape": [-1, 784]}],
        "outputs": [{"name": "scores", "dtype": "DT_FLOAT", "shape": [-1, 10]}]}}}"#;

    #[test]
    fn parses_and_resolves() {
        let map = SignatureMap::from_json(MNIST.as_bytes()).unwrap();
        let (name, sig) = map.resolve("").unwrap();
        assert_eq!(name, "predict_images");
        assert_eq!(sig.method, "forward");
        assert_eq!(sig.input("images").unwrap().dtype, DType::F32);
        let err = map.resolve("classify").unwrap_err();
        assert!(err.contains("predict_images"), "{err}");
        let untyped = SignatureMap::default_for_untyped_model();
        assert_eq!(untyped.resolve("").unwrap().0, DEFAULT_SIGNATURE);
    }

    #[test]
    fn rejects_bad_signatures() {
        for (bad, needle) in [
            (r#"{"signatures": {}}"#, "empty"),
            (
                r#"{"signatures": {"s": {"inputs": [], "outputs": [{"name":"o","dtype":"float32"}]}}}"#,
                "at least one",
            ),
            (
                r#"{"signatures": {"s": {"inputs": [{"name":"i","dtype":"float32","shape":[3,4]}], "outputs": [{"name":"o","dtype":"float32"}]}}}"#,
                "batch dimension",
            ),
            (
                r#"{"signatures": {"s": {"inputs": [{"name":"i","dtype":"complex"}], "outputs": [{"name":"o","dtype":"float32"}]}}}"#,
                "unknown dtype",
            ),
            (
                r#"{"signatures": {"s": {"inputs": [{"name":"i","dtype":"float32","shap":[-1]}], "outputs": [{"name":"o","dtype":"float32"}]}}}"#,
                "shap",
            ),
            (
                r#"{"signatures": {"s": {"inputs": [{"name":"i","dtype":"float32"},{"name":"i","dtype":"float32"}], "outputs": [{"name":"o","dtype":"float32"}]}}}"#,
                "unique",
            ),
            ("not json", "signature.json"),
            // Found by `make fuzz` (signature_json): accepted, but no request could name it.
            (
                r#"{"signatures": {"": {"inputs": [{"name":"i","dtype":"float32"}], "outputs": [{"name":"o","dtype":"float32"}]}}}"#,
                "empty name",
            ),
        ] {
            let err = SignatureMap::from_json(bad.as_bytes()).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    /// The etcd_values fuzz target asserts this: signatures inside a registry value used to
    /// skip the checks `signature.json` gets, and the worker loads versions with them.
    #[test]
    fn signatures_from_any_json_are_checked() {
        let bad = r#"{"version": 1, "path": "file:///m/1", "signatures": {"signatures": {"s": {"inputs": [], "outputs": [{"name":"o","dtype":"float32"}]}}}}"#;
        let err = serde_json::from_str::<crate::AvailableVersion>(bad).unwrap_err();
        assert!(err.to_string().contains("at least one input"), "{err}");
        let good = bad.replace(
            r#""inputs": []"#,
            r#""inputs": [{"name":"i","dtype":"float32"}]"#,
        );
        assert!(serde_json::from_str::<crate::AvailableVersion>(&good).is_ok());
    }

    #[test]
    fn checks_tensors() {
        let map = SignatureMap::from_json(MNIST.as_bytes()).unwrap();
        let spec = map.signatures["predict_images"].input("images").unwrap();
        assert!(spec.check(DType::F32, &[3, 784]).is_ok());
        let err = spec.check(DType::F32, &[1, 783]).unwrap_err();
        assert_eq!(
            err,
            "input 'images' has shape [1, 783]; the signature expects [-1, 784]"
        );
        assert!(
            spec.check(DType::F64, &[1, 784])
                .unwrap_err()
                .contains("DT_DOUBLE")
        );
        assert_eq!(spec.concrete_shape(8), Some(vec![8, 784]));
    }
}
