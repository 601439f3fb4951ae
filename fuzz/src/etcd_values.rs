//! The registry's keys and values ([`aspire_core::keys`], [`aspire_core::records`]): what
//! every role builds its [`ClusterState`] from.
//!
//! Input: records separated by a NUL byte, each one selector byte and a value. The
//! selector's high bit deletes the key; the rest picks a model key (`available`,
//! `aspired`, `pinned` of two models), a worker key, or a raw key (the value up to its
//! first `0x01` byte, the rest being the value).
//!
//! For any sequence: applying it does not panic. Each key that parses rebuilds from its
//! parts. A value that leaves no problem behind is what the state holds for that key.
//! Every version in the state is a valid [`Version`] (1 to `i64::MAX`), every signature
//! map from the registry passes the checks `signature.json` gets, and the desired versions
//! of every model are ascending, unique and, when pinned, available.

use aspire_core::keys::{KeySchema, ModelKey, ParsedKey, valid_worker_id};
use aspire_core::{
    AspiredVersions, AvailableVersions, ClusterState, DesiredSource, ModelName, SignatureMap,
    Version, WorkerRecord,
};

const MODEL_KEYS: [ModelKey; 3] = [ModelKey::Available, ModelKey::Aspired, ModelKey::Pinned];

/// Checks one input (see the module docs).
pub fn check(data: &[u8]) {
    let schema = KeySchema::default();
    let models = [
        ModelName::new("mnist").expect("valid"),
        ModelName::new("half").expect("valid"),
    ];
    let mut state = ClusterState::default();
    for record in data.split(|b| *b == 0) {
        let Some((&selector, value)) = record.split_first() else {
            continue;
        };
        let delete = selector & 0x80 != 0;
        let (key, value) = match (selector & 0x7f) % 9 {
            n @ 0..=5 => (
                schema.model_key(&models[usize::from(n / 3)], MODEL_KEYS[usize::from(n % 3)]),
                value,
            ),
            n @ (6 | 7) => (schema.worker_key(&format!("w-{n}")), value),
            _ => {
                let cut = value.iter().position(|b| *b == 1).unwrap_or(value.len());
                let key = String::from_utf8_lossy(&value[..cut]).into_owned();
                (key, value.get(cut + 1..).unwrap_or_default())
            }
        };
        let value = (!delete).then_some(value);
        state.apply(&schema, &key, value);
        check_key(&schema, &key);
        check_applied(&schema, &state, &key, value);
        check_state(&state);
    }
}

fn check_key(schema: &KeySchema, key: &str) {
    match schema.parse(key) {
        Some(ParsedKey::Model(model, which)) => assert_eq!(schema.model_key(&model, which), key),
        Some(ParsedKey::Worker(id)) => {
            assert!(valid_worker_id(&id), "{id:?}");
            assert_eq!(schema.worker_key(&id), key);
        }
        Some(ParsedKey::Unknown(why)) => assert!(!why.is_empty()),
        None => assert!(
            !key.starts_with(&schema.root()),
            "{key:?} is under the prefix"
        ),
    }
}

/// A value that left no problem behind is the one the state holds.
fn check_applied(schema: &KeySchema, state: &ClusterState, key: &str, value: Option<&[u8]>) {
    if state.problems.contains_key(key) {
        assert!(value.is_some(), "a deleted key {key:?} left a problem");
        return;
    }
    match (schema.parse(key), value) {
        (Some(ParsedKey::Model(model, which)), value) => {
            let entry = state.models.get(&model);
            match (which, value) {
                (ModelKey::Available, Some(v)) => assert_eq!(
                    entry.and_then(|e| e.available.as_ref()),
                    Some(&serde_json::from_slice::<AvailableVersions>(v).expect("accepted"))
                ),
                (ModelKey::Aspired, Some(v)) => assert_eq!(
                    entry.and_then(|e| e.aspired.as_ref()),
                    Some(&serde_json::from_slice::<AspiredVersions>(v).expect("accepted"))
                ),
                (ModelKey::Pinned, Some(v)) => assert_eq!(
                    entry.and_then(|e| e.pinned.as_deref()).map(str::as_bytes),
                    Some(v)
                ),
                (ModelKey::Available, None) => assert!(entry.is_none_or(|e| e.available.is_none())),
                (ModelKey::Aspired, None) => assert!(entry.is_none_or(|e| e.aspired.is_none())),
                (ModelKey::Pinned, None) => assert!(entry.is_none_or(|e| e.pinned.is_none())),
            }
        }
        (Some(ParsedKey::Worker(id)), Some(v)) => assert_eq!(
            state.workers.get(&id),
            Some(&serde_json::from_slice::<WorkerRecord>(v).expect("accepted"))
        ),
        (Some(ParsedKey::Worker(id)), None) => assert!(!state.workers.contains_key(&id)),
        (Some(ParsedKey::Unknown(_)), v) => assert!(v.is_none(), "{key:?} was accepted"),
        (None, _) => {}
    }
}

fn check_state(state: &ClusterState) {
    for (model, entry) in &state.models {
        assert!(
            entry.available.is_some() || entry.aspired.is_some() || entry.pinned.is_some(),
            "{model} is kept with no keys"
        );
        if let Some(available) = &entry.available {
            for v in &available.versions {
                check_version(v.version);
                let json = serde_json::to_vec(&v.signatures).expect("serializes");
                if let Err(e) = SignatureMap::from_json(&json) {
                    panic!(
                        "{model} v{}: the registry's signatures fail: {e}",
                        v.version
                    );
                }
            }
        }
        for v in entry.aspired.iter().flat_map(|a| &a.versions) {
            check_version(*v);
        }
        let desired = state.desired(model);
        desired.versions.iter().copied().for_each(check_version);
        if desired.source == DesiredSource::Pinned {
            assert!(desired.pin_problem.is_none());
            assert!(!desired.versions.is_empty(), "{model}: an empty pin");
            assert!(
                desired.versions.windows(2).all(|w| w[0] < w[1]),
                "{desired:?}"
            );
            let available = entry.available.as_ref().expect("a pin needs available");
            assert!(desired.versions.iter().all(|v| available.get(*v).is_some()));
        }
    }
    for (id, worker) in &state.workers {
        assert!(valid_worker_id(id), "{id:?}");
        for versions in worker.models.values() {
            versions.keys().copied().for_each(check_version);
        }
    }
    for key in state.problems.keys() {
        assert!(key.starts_with(&KeySchema::default().root()), "{key:?}");
    }
}

/// A version is 1 to `i64::MAX`, as `Version::new`, `from_i64` and `FromStr` make them.
fn check_version(v: Version) {
    assert!(
        v.get() >= 1 && i64::try_from(v.get()).is_ok(),
        "version {} came from the registry",
        v.get()
    );
}
