//! The records roles exchange through the registry, and [`ClusterState`], the parsed view
//! of every key under the prefix that each role watches.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::keys::{KeySchema, ModelKey, ParsedKey};
use crate::model::{ModelName, Version, list_versions};
use crate::signature::SignatureMap;

/// One complete version found in storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvailableVersion {
    /// The version number.
    pub version: Version,
    /// Where the version's directory is (a URL: `file:///...`, `s3://...`).
    pub path: String,
    /// Its signatures (from `signature.json`, or the default one).
    pub signatures: SignatureMap,
}

/// `<prefix>/models/<model>/available`: every complete version in storage, ascending.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AvailableVersions {
    /// The versions, ascending.
    pub versions: Vec<AvailableVersion>,
}

impl AvailableVersions {
    /// The version numbers, ascending.
    pub fn numbers(&self) -> Vec<Version> {
        self.versions.iter().map(|v| v.version).collect()
    }

    /// The entry of `version`.
    pub fn get(&self, version: Version) -> Option<&AvailableVersion> {
        self.versions.iter().find(|v| v.version == version)
    }
}

/// `<prefix>/models/<model>/aspired`: the versions the model's policy selects.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AspiredVersions {
    /// The versions, ascending.
    pub versions: Vec<Version>,
}

/// A version's life cycle on a worker, with TensorFlow Serving's state numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VersionState {
    /// Known, not yet loading.
    Start,
    /// Being fetched, loaded and warmed up.
    Loading,
    /// Serving.
    Available,
    /// Draining its in-flight requests before unload.
    Unloading,
    /// Unloaded, or its load failed (then the status has the error).
    End,
}

impl VersionState {
    /// `ModelVersionStatus.State` number in TensorFlow Serving's API.
    pub fn tf_number(self) -> i32 {
        match self {
            VersionState::Start => 10,
            VersionState::Loading => 20,
            VersionState::Available => 30,
            VersionState::Unloading => 40,
            VersionState::End => 50,
        }
    }
}

impl std::fmt::Display for VersionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VersionState::Start => "START",
            VersionState::Loading => "LOADING",
            VersionState::Available => "AVAILABLE",
            VersionState::Unloading => "UNLOADING",
            VersionState::End => "END",
        })
    }
}

/// A version's state and, when its load failed, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionStatus {
    /// The state.
    pub state: VersionState,
    /// The error of the last failed load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `<prefix>/workers/<worker-id>`: where a worker listens and what it has loaded.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// The gRPC address others reach it at, `host:port`.
    pub address: String,
    /// The device it runs models on (`cpu`, `cuda:0`).
    pub device: String,
    /// Per model, each version's status.
    pub models: BTreeMap<ModelName, BTreeMap<Version, VersionStatus>>,
    /// Versions with forward passes that ran past the worker's `--slow-pass-seconds`
    /// (absent from records of workers that had none, or that predate the field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slow_passes: Vec<SlowPasses>,
}

/// A version's forward passes that ran past the worker's slow-pass threshold: a model
/// stuck or far slower than usual on some input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlowPasses {
    /// The model.
    pub model: ModelName,
    /// The version.
    pub version: Version,
    /// Passes running past the threshold now.
    pub running: u64,
    /// Passes that ran past it since the version loaded (those running now included).
    pub total: u64,
}

impl WorkerRecord {
    /// Versions of `model` this worker has AVAILABLE.
    pub fn available_versions(&self, model: &ModelName) -> Vec<Version> {
        self.models
            .get(model)
            .map(|m| {
                m.iter()
                    .filter(|(_, s)| s.state == VersionState::Available)
                    .map(|(v, _)| *v)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Where a model's desired versions came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DesiredSource {
    /// A valid `pinned` key.
    Pinned,
    /// The `aspired` key (no pin, or an invalid one).
    Aspired,
}

/// The versions a model should serve now: pinned when valid, else aspired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The versions, ascending.
    pub versions: Vec<Version>,
    /// Where they came from.
    pub source: DesiredSource,
    /// Why a present `pinned` value is ignored.
    pub pin_problem: Option<String>,
}

/// The parsed keys of one model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelState {
    /// Last good `available` value.
    pub available: Option<AvailableVersions>,
    /// Last good `aspired` value.
    pub aspired: Option<AspiredVersions>,
    /// The `pinned` value as written (validated against `available` by [`Self::desired`]).
    pub pinned: Option<String>,
}

impl ModelState {
    fn is_empty(&self) -> bool {
        self.available.is_none() && self.aspired.is_none() && self.pinned.is_none()
    }

    /// The desired versions: a valid pin replaces the aspired versions as a whole.
    pub fn desired(&self) -> Desired {
        let aspired = self
            .aspired
            .as_ref()
            .map(|a| a.versions.clone())
            .unwrap_or_default();
        let Some(raw) = &self.pinned else {
            return Desired {
                versions: aspired,
                source: DesiredSource::Aspired,
                pin_problem: None,
            };
        };
        match parse_pin(raw, self.available.as_ref()) {
            Ok(versions) => Desired {
                versions,
                source: DesiredSource::Pinned,
                pin_problem: None,
            },
            Err(why) => Desired {
                versions: aspired,
                source: DesiredSource::Aspired,
                pin_problem: Some(why),
            },
        }
    }
}

/// Parses a `pinned` value ("1" or "1,2", spaces allowed) and checks every version is
/// available. A value with any bad entry is refused as a whole.
pub fn parse_pin(raw: &str, available: Option<&AvailableVersions>) -> Result<Vec<Version>, String> {
    let mut versions = Vec::new();
    for part in raw.trim().split(',') {
        let part = part.trim();
        let v: Version = part.parse().map_err(|_| {
            format!("pinned value {raw:?} is not a version or a comma-separated list of versions")
        })?;
        versions.push(v);
    }
    versions.sort_unstable();
    versions.dedup();
    let known = available
        .map(AvailableVersions::numbers)
        .unwrap_or_default();
    let missing: Vec<Version> = versions
        .iter()
        .copied()
        .filter(|v| !known.contains(v))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "pinned version(s) {} not available; available: {}",
            list_versions(missing),
            list_versions(known)
        ));
    }
    Ok(versions)
}

/// Everything under the prefix, parsed: what each role watches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterState {
    /// Models by name.
    pub models: BTreeMap<ModelName, ModelState>,
    /// Live workers by id.
    pub workers: BTreeMap<String, WorkerRecord>,
    /// Keys whose name or value could not be used, with why (typos, bad JSON).
    pub problems: BTreeMap<String, String>,
}

impl ClusterState {
    /// Applies one key's new value (`None`: deleted). Keys outside the schema's prefix are
    /// ignored; a bad key or value is recorded in `problems` and logged, and the last good
    /// value is kept.
    pub fn apply(&mut self, schema: &KeySchema, key: &str, value: Option<&[u8]>) {
        let Some(parsed) = schema.parse(key) else {
            return;
        };
        let result = match parsed {
            ParsedKey::Unknown(why) => Err(why),
            ParsedKey::Worker(id) => match value {
                None => {
                    self.workers.remove(&id);
                    Ok(())
                }
                Some(bytes) => serde_json::from_slice::<WorkerRecord>(bytes)
                    .map(|rec| {
                        self.workers.insert(id, rec);
                    })
                    .map_err(|e| format!("key {key:?}: bad worker record: {e}")),
            },
            ParsedKey::Model(model, which) => {
                let entry = self.models.entry(model.clone()).or_default();
                let result =
                    apply_model_key(entry, which, value).map_err(|e| format!("key {key:?}: {e}"));
                if entry.is_empty() {
                    self.models.remove(&model);
                }
                result
            }
        };
        match result {
            Ok(()) => {
                self.problems.remove(key);
            }
            Err(why) => {
                if value.is_none() {
                    self.problems.remove(key);
                } else if self.problems.get(key) != Some(&why) {
                    tracing::warn!("ignoring registry {why}");
                    self.problems.insert(key.to_string(), why);
                }
            }
        }
    }

    /// The desired versions of `model` (empty when unknown).
    pub fn desired(&self, model: &ModelName) -> Desired {
        self.models
            .get(model)
            .map(ModelState::desired)
            .unwrap_or(Desired {
                versions: Vec::new(),
                source: DesiredSource::Aspired,
                pin_problem: None,
            })
    }
}

fn apply_model_key(
    entry: &mut ModelState,
    which: ModelKey,
    value: Option<&[u8]>,
) -> Result<(), String> {
    match (which, value) {
        (ModelKey::Available, None) => entry.available = None,
        (ModelKey::Aspired, None) => entry.aspired = None,
        (ModelKey::Pinned, None) => entry.pinned = None,
        (ModelKey::Available, Some(b)) => {
            entry.available = Some(serde_json::from_slice(b).map_err(|e| format!("bad JSON: {e}"))?)
        }
        (ModelKey::Aspired, Some(b)) => {
            entry.aspired = Some(serde_json::from_slice(b).map_err(|e| format!("bad JSON: {e}"))?)
        }
        (ModelKey::Pinned, Some(b)) => {
            let text =
                std::str::from_utf8(b).map_err(|_| "pinned value is not UTF-8".to_string())?;
            entry.pinned = Some(text.to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: u64) -> Version {
        Version::new(n).unwrap()
    }

    fn available(nums: &[u64]) -> Vec<u8> {
        let a = AvailableVersions {
            versions: nums
                .iter()
                .map(|n| AvailableVersion {
                    version: v(*n),
                    path: format!("file:///m/{n}"),
                    signatures: SignatureMap::default_for_untyped_model(),
                })
                .collect(),
        };
        serde_json::to_vec(&a).unwrap()
    }

    #[test]
    fn pin_replaces_aspired_only_when_valid() {
        let s = KeySchema::default();
        let mut st = ClusterState::default();
        let m = ModelName::new("mnist").unwrap();
        st.apply(
            &s,
            "/aspire/models/mnist/available",
            Some(&available(&[1, 2])),
        );
        st.apply(
            &s,
            "/aspire/models/mnist/aspired",
            Some(br#"{"versions":[2]}"#),
        );
        assert_eq!(st.desired(&m).versions, vec![v(2)]);

        st.apply(&s, "/aspire/models/mnist/pinned", Some(b"1"));
        let d = st.desired(&m);
        assert_eq!((d.versions, d.source), (vec![v(1)], DesiredSource::Pinned));

        for bad in ["3", "1,x", "garbage", "", "1,3"] {
            st.apply(&s, "/aspire/models/mnist/pinned", Some(bad.as_bytes()));
            let d = st.desired(&m);
            assert_eq!(d.versions, vec![v(2)], "pin {bad:?}");
            assert!(d.pin_problem.is_some(), "pin {bad:?}");
        }
        st.apply(&s, "/aspire/models/mnist/pinned", Some(b" 2, 1 "));
        assert_eq!(st.desired(&m).versions, vec![v(1), v(2)]);
        st.apply(&s, "/aspire/models/mnist/pinned", None);
        assert_eq!(st.desired(&m).source, DesiredSource::Aspired);
    }

    #[test]
    fn bad_values_keep_the_last_good_one() {
        let s = KeySchema::default();
        let mut st = ClusterState::default();
        let m = ModelName::new("mnist").unwrap();
        st.apply(
            &s,
            "/aspire/models/mnist/aspired",
            Some(br#"{"versions":[2]}"#),
        );
        st.apply(&s, "/aspire/models/mnist/aspired", Some(b"{nope"));
        assert_eq!(st.desired(&m).versions, vec![v(2)]);
        assert!(st.problems.contains_key("/aspire/models/mnist/aspired"));
        st.apply(&s, "/aspire/models/mnist/pined", Some(b"1"));
        assert!(st.problems["/aspire/models/mnist/pined"].contains("pinned"));
        st.apply(&s, "/elsewhere/x", Some(b"1"));
        assert_eq!(st.problems.len(), 2);
        st.apply(&s, "/aspire/models/mnist/aspired", None);
        assert!(st.models.is_empty());
        assert!(!st.problems.contains_key("/aspire/models/mnist/aspired"));
    }

    #[test]
    fn an_available_value_with_an_invalid_version_is_refused_whole() {
        let s = KeySchema::default();
        let mut st = ClusterState::default();
        let m = ModelName::new("mnist").unwrap();
        let key = "/aspire/models/mnist/available";
        st.apply(&s, key, Some(&available(&[1])));
        let sig = serde_json::to_string(&SignatureMap::default_for_untyped_model()).unwrap();
        for bad in ["0", "-2", "18446744073709551615"] {
            let value = format!(
                r#"{{"versions":[{{"version":{bad},"path":"file:///m/{bad}","signatures":{sig}}}]}}"#
            );
            st.apply(&s, key, Some(value.as_bytes()));
            assert!(st.problems.contains_key(key), "version {bad} accepted");
            assert_eq!(
                st.models[&m].available.as_ref().unwrap().numbers(),
                vec![v(1)]
            );
        }
        // A model key with an invalid model name is never a model.
        st.apply(&s, "/aspire/models/../available", Some(&available(&[1])));
        st.apply(&s, "/aspire/models/a b/available", Some(&available(&[1])));
        assert_eq!(st.models.len(), 1);
    }

    #[test]
    fn workers_come_and_go() {
        let s = KeySchema::default();
        let mut st = ClusterState::default();
        let m = ModelName::new("mnist").unwrap();
        let rec = WorkerRecord {
            address: "127.0.0.1:1".into(),
            device: "cpu".into(),
            models: BTreeMap::from([(
                m.clone(),
                BTreeMap::from([
                    (
                        v(1),
                        VersionStatus {
                            state: VersionState::Available,
                            error: None,
                        },
                    ),
                    (
                        v(2),
                        VersionStatus {
                            state: VersionState::Loading,
                            error: None,
                        },
                    ),
                ]),
            )]),
            ..Default::default()
        };
        st.apply(
            &s,
            "/aspire/workers/w1",
            Some(&serde_json::to_vec(&rec).unwrap()),
        );
        assert_eq!(st.workers["w1"].available_versions(&m), vec![v(1)]);
        let json = String::from_utf8(serde_json::to_vec(&rec).unwrap()).unwrap();
        assert!(json.contains("\"AVAILABLE\""), "{json}");
        st.apply(&s, "/aspire/workers/w1", None);
        assert!(st.workers.is_empty());
    }

    #[test]
    fn slow_passes_are_optional_both_ways() {
        // A record from a worker that predates the field still parses, with none.
        let old = r#"{"address":"127.0.0.1:1","device":"cpu","models":{}}"#;
        let rec: WorkerRecord = serde_json::from_str(old).unwrap();
        assert!(rec.slow_passes.is_empty());
        // Without slow passes the record is written as before.
        assert_eq!(serde_json::to_string(&rec).unwrap(), old);
        let slow = WorkerRecord {
            slow_passes: vec![SlowPasses {
                model: ModelName::new("m").unwrap(),
                version: v(2),
                running: 1,
                total: 3,
            }],
            ..rec
        };
        let json = serde_json::to_string(&slow).unwrap();
        assert!(
            json.contains(r#""slow_passes":[{"model":"m","version":2,"running":1,"total":3}]"#),
            "{json}"
        );
        // An older reader ignores the unknown field (serde's default).
        #[derive(serde::Deserialize)]
        struct OldRecord {
            address: String,
        }
        let parsed: OldRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed.address, "127.0.0.1:1");
        assert_eq!(serde_json::from_str::<WorkerRecord>(&json).unwrap(), slow);
    }
}
