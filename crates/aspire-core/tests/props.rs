//! Property tests of the registry key schema, its records and `signature.json`: parsing
//! never panics, what is built parses back, and what is parsed satisfies the checks the
//! rest of Aspire relies on. A short run (256 cases each) in every `cargo test`; `make
//! fuzz` explores the same parsers for longer.

use aspire_core::keys::{KeySchema, ModelKey, ParsedKey, valid_worker_id};
use aspire_core::records::parse_pin;
use aspire_core::{
    AspiredVersions, AvailableVersion, AvailableVersions, ClusterState, DType, ModelName,
    Signature, SignatureMap, TensorSpec, Version, WorkerRecord,
};
use proptest::prelude::*;

const MODEL_KEYS: [ModelKey; 3] = [ModelKey::Available, ModelKey::Aspired, ModelKey::Pinned];

fn model_name() -> impl Strategy<Value = ModelName> {
    "[A-Za-z0-9_.-]{1,24}".prop_filter_map("not . or ..", |s| ModelName::new(s).ok())
}

/// Printable ASCII but `/`, as `valid_worker_id` wants.
fn worker_id() -> impl Strategy<Value = String> {
    "[!-.0-~]{1,40}"
}

fn prefix() -> impl Strategy<Value = String> {
    "/?([a-z0-9_-]{1,8}/){0,2}[a-z0-9_-]{1,8}/?"
}

fn version() -> impl Strategy<Value = Version> {
    (1..=i64::MAX).prop_map(|v| Version::from_i64(v).expect("positive"))
}

fn tensor_spec(name: String) -> impl Strategy<Value = TensorSpec> {
    let dims = prop::collection::vec(prop_oneof![Just(-1i64), 1..4096i64], 0..4);
    (
        0..DType::ALL.len(),
        prop::option::of(dims.prop_map(|mut d| {
            d.insert(0, -1);
            d
        })),
    )
        .prop_map(move |(dtype, shape)| TensorSpec {
            name: name.clone(),
            dtype: DType::ALL[dtype],
            shape,
        })
}

fn specs() -> impl Strategy<Value = Vec<TensorSpec>> {
    prop::collection::btree_set("[a-z_][a-z0-9_]{0,8}", 1..4)
        .prop_flat_map(|names| names.into_iter().map(tensor_spec).collect::<Vec<_>>())
}

fn signature_map() -> impl Strategy<Value = SignatureMap> {
    let signature =
        ("[a-z_]{1,10}", specs(), specs()).prop_map(|(method, inputs, outputs)| Signature {
            method,
            inputs,
            outputs,
        });
    prop::collection::btree_map("[a-z_]{1,12}", signature, 1..3)
        .prop_map(|signatures| SignatureMap { signatures })
}

/// JSON with one character replaced, cut or doubled: mostly near-valid documents.
fn mutated(json: String, at: usize, how: u8, with: char) -> String {
    let mut chars: Vec<char> = json.chars().collect();
    let i = at % chars.len().max(1);
    match how % 3 {
        0 if !chars.is_empty() => chars[i] = with,
        1 => chars.truncate(i),
        _ => chars.insert(i, with),
    }
    chars.into_iter().collect()
}

fn check_version(v: Version) {
    assert!(
        v.get() >= 1 && i64::try_from(v.get()).is_ok(),
        "version {v}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn model_keys_parse_back(prefix in prefix(), model in model_name(), which in 0..3usize) {
        let schema = KeySchema::new(&prefix);
        let key = schema.model_key(&model, MODEL_KEYS[which]);
        prop_assert_eq!(schema.parse(&key), Some(ParsedKey::Model(model, MODEL_KEYS[which])));
    }

    #[test]
    fn worker_keys_parse_back(prefix in prefix(), id in worker_id()) {
        let schema = KeySchema::new(&prefix);
        prop_assert!(valid_worker_id(&id));
        prop_assert_eq!(schema.parse(&schema.worker_key(&id)), Some(ParsedKey::Worker(id)));
    }

    #[test]
    fn any_key_parses_to_something_that_rebuilds_it(
        key in "(/aspire)?(/(models|workers|available|pinned|[a-z.]{0,4}|[^/]{0,6})){0,4}/?"
    ) {
        let schema = KeySchema::default();
        match schema.parse(&key) {
            Some(ParsedKey::Model(model, which)) => {
                prop_assert_eq!(schema.model_key(&model, which), key);
            }
            Some(ParsedKey::Worker(id)) => prop_assert_eq!(schema.worker_key(&id), key),
            Some(ParsedKey::Unknown(why)) => prop_assert!(why.contains("key")),
            None => prop_assert!(!key.starts_with("/aspire/")),
        }
    }

    #[test]
    fn pins_are_accepted_only_when_every_entry_is_available(
        pinned in prop::collection::vec(0u64..8, 1..4),
        available in prop::collection::btree_set(1u64..8, 0..5),
        spaces in prop::collection::vec(" {0,2}", 8),
    ) {
        let raw: Vec<String> = pinned
            .iter()
            .zip(&spaces)
            .map(|(v, s)| format!("{s}{v}{s}"))
            .collect();
        let raw = raw.join(",");
        let record = AvailableVersions {
            versions: available
                .iter()
                .map(|v| AvailableVersion {
                    version: Version::new(*v).expect("positive"),
                    path: format!("file:///m/{v}"),
                    signatures: SignatureMap::default_for_untyped_model(),
                })
                .collect(),
        };
        let result = parse_pin(&raw, Some(&record));
        let all_available = pinned.iter().all(|v| available.contains(v));
        prop_assert_eq!(result.is_ok(), all_available, "{:?}: {:?}", raw, result);
        if let Ok(versions) = result {
            let mut expected: Vec<u64> = pinned.clone();
            expected.sort_unstable();
            expected.dedup();
            prop_assert_eq!(versions.iter().map(|v| v.get()).collect::<Vec<_>>(), expected);
        }
    }

    #[test]
    fn any_pin_text_is_parsed_or_refused(raw in "[0-9, x-]{0,12}") {
        if let Ok(versions) = parse_pin(&raw, None) {
            prop_assert!(versions.is_empty(), "{:?} pinned {:?} with nothing available", raw, versions);
        }
    }

    #[test]
    fn registry_versions_are_positive_and_fit_protobuf(v in prop_oneof![0u64..4, Just(u64::MAX), any::<u64>()]) {
        for json in [
            format!(r#"{{"versions":[{v}]}}"#),
            format!(r#"{{"address":"a:1","device":"cpu","models":{{"m":{{"{v}":{{"state":"AVAILABLE"}}}}}}}}"#),
        ] {
            if let Ok(a) = serde_json::from_str::<AspiredVersions>(&json) {
                a.versions.into_iter().for_each(check_version);
            }
            if let Ok(w) = serde_json::from_str::<WorkerRecord>(&json) {
                w.models.values().flat_map(|m| m.keys().copied()).for_each(check_version);
            }
        }
    }

    #[test]
    fn registry_values_never_break_the_cluster_state(
        writes in prop::collection::vec(
            (0..7usize, prop::option::of(prop_oneof![
                any::<Vec<u8>>(),
                (version(), 0..100usize, any::<u8>(), any::<char>()).prop_map(|(v, at, how, with)| {
                    mutated(format!(r#"{{"versions":[{v}]}}"#), at, how, with).into_bytes()
                }),
                "[0-9, ]{0,6}".prop_map(String::into_bytes),
            ])),
            1..12,
        )
    ) {
        let schema = KeySchema::default();
        let model = ModelName::new("m").expect("valid");
        let mut state = ClusterState::default();
        for (which, value) in &writes {
            let key = match which {
                0..=2 => schema.model_key(&model, MODEL_KEYS[*which]),
                3 => schema.worker_key("w-1"),
                4 => "/aspire/models/m/pined".to_string(),
                5 => "/aspire/workers/".to_string(),
                _ => "/elsewhere/models/m/pinned".to_string(),
            };
            state.apply(&schema, &key, value.as_deref());
            for entry in state.models.values() {
                entry.aspired.iter().flat_map(|a| &a.versions).copied().for_each(check_version);
                let desired = state.desired(&model);
                prop_assert!(desired.versions.windows(2).all(|w| w[0] != w[1]));
            }
            if value.is_none() {
                prop_assert!(!state.problems.contains_key(&key));
            }
            prop_assert!(state.problems.keys().all(|k| k.starts_with("/aspire/")));
        }
    }

    #[test]
    fn valid_signature_maps_round_trip_through_json(map in signature_map()) {
        let json = serde_json::to_vec_pretty(&map).expect("serializes");
        let back = SignatureMap::from_json(&json);
        prop_assert_eq!(back.as_ref(), Ok(&map));
        for sig in map.signatures.values() {
            for spec in sig.inputs.iter().chain(&sig.outputs) {
                if let Some(shape) = spec.concrete_shape(3) {
                    prop_assert_eq!(spec.check(spec.dtype, &shape), Ok(()));
                }
            }
        }
    }

    #[test]
    fn near_valid_signature_json_is_parsed_or_refused_with_a_reason(
        map in signature_map(), at in any::<usize>(), how in any::<u8>(), with in any::<char>()
    ) {
        let json = mutated(serde_json::to_string(&map).expect("serializes"), at, how, with);
        match SignatureMap::from_json(json.as_bytes()) {
            Ok(parsed) => {
                for (name, sig) in &parsed.signatures {
                    prop_assert!(!sig.inputs.is_empty() && !sig.outputs.is_empty(), "{}", name);
                    for spec in sig.inputs.iter().chain(&sig.outputs) {
                        if let Some(shape) = &spec.shape {
                            prop_assert_eq!(shape.first(), Some(&-1));
                            prop_assert!(shape.iter().all(|d| *d == -1 || *d > 0));
                        }
                    }
                }
            }
            Err(e) => prop_assert!(e.starts_with("signature.json: "), "{}", e),
        }
    }
}

#[test]
fn the_default_signature_map_passes_its_own_checks() {
    let map = SignatureMap::default_for_untyped_model();
    let json = serde_json::to_vec(&map).expect("serializes");
    assert_eq!(SignatureMap::from_json(&json), Ok(map));
}
