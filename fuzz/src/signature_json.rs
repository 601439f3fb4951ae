//! `signature.json` ([`aspire_core::SignatureMap::from_json`]).
//!
//! For any bytes: parsing does not panic. A map it accepts has at least one signature;
//! each has a method, at least one input and one output, unique non-empty names, and
//! shapes whose dimension 0 is -1 and whose other sizes are positive or -1. Written back
//! as JSON it parses to the same map. Resolving any name, or none, does not panic and
//! finds a signature that exists. A tensor of the spec's concrete shape (batch 1) passes
//! the spec's own check.

use std::collections::BTreeSet;

use aspire_core::SignatureMap;

/// Checks one input (see the module docs).
pub fn check(data: &[u8]) {
    let Ok(map) = SignatureMap::from_json(data) else {
        return;
    };
    assert!(!map.signatures.is_empty());
    for (name, sig) in &map.signatures {
        assert!(!sig.method.is_empty(), "{name}: empty method");
        assert!(!sig.inputs.is_empty() && !sig.outputs.is_empty(), "{name}");
        for list in [&sig.inputs, &sig.outputs] {
            let names: BTreeSet<&str> = list.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names.len(), list.len(), "{name}: duplicate names");
            for spec in list {
                assert!(!spec.name.is_empty(), "{name}: empty tensor name");
                if let Some(shape) = &spec.shape {
                    assert_eq!(shape.first(), Some(&-1), "{name}: {shape:?}");
                    assert!(shape.iter().all(|d| *d == -1 || *d > 0), "{shape:?}");
                }
                if let Some(concrete) = spec.concrete_shape(1) {
                    spec.check(spec.dtype, &concrete)
                        .expect("the spec's own concrete shape passes");
                }
            }
        }
        let (resolved, _) = map.resolve(name).expect("an existing name resolves");
        assert_eq!(resolved, name);
    }
    if let Ok((resolved, _)) = map.resolve("") {
        assert!(map.signatures.contains_key(resolved));
    }
    let json = serde_json::to_vec(&map).expect("a parsed map serializes");
    let again = SignatureMap::from_json(&json).expect("a serialized map parses");
    assert_eq!(again, map, "JSON round trip");
}
