//! Which models discovery watches: TensorFlow Serving's text-format `ModelServerConfig`
//! (`--model_config_file`) or one model from `--model_name`/`--model_base_path`, checked
//! once and turned into [`ModelConfig`]s.

use std::collections::{BTreeMap, BTreeSet};

use aspire_core::{ModelName, Version, VersionPolicy};
use aspire_proto::serving::file_system_storage_path_source_config::ServableVersionPolicy;
use aspire_proto::serving::file_system_storage_path_source_config::servable_version_policy::PolicyChoice;
use aspire_proto::serving::{self, ModelServerConfig, model_server_config};

/// One model to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    /// The name clients use.
    pub name: ModelName,
    /// The directory or URL holding one subdirectory per version, as given.
    pub base_path: String,
    /// Which of the complete versions to serve.
    pub policy: VersionPolicy,
    /// TensorFlow Serving's version labels (`stable: 3`); discovery only carries them.
    pub version_labels: BTreeMap<String, Version>,
}

impl ModelConfig {
    /// The one model of `--model_name`/`--model_base_path`, serving its latest version.
    /// Errors name the flag that is wrong.
    pub fn single(name: &str, base_path: &str) -> Result<Self, String> {
        let name = ModelName::new(name).map_err(|e| format!("--model_name: {e}"))?;
        if base_path.trim().is_empty() {
            return Err("--model_base_path is empty; give the directory or URL that holds the model's version directories".to_string());
        }
        Ok(Self {
            name,
            base_path: base_path.to_string(),
            policy: VersionPolicy::default(),
            version_labels: BTreeMap::new(),
        })
    }
}

/// Parses the text of a `--model_config_file` (a text-format
/// `tensorflow.serving.ModelServerConfig`). `model_platform` is accepted and ignored:
/// Aspire serves TorchScript whatever the file says, so TF Serving configs work unchanged.
///
/// An empty file (no `model_config_list`) is no models. Errors are sentences naming the
/// model and field.
pub fn parse_model_config_file(text: &str) -> Result<Vec<ModelConfig>, String> {
    let parsed: ModelServerConfig =
        aspire_proto::parse_text_format("tensorflow.serving.ModelServerConfig", text)
            .map_err(|e| format!("model config file: {e}"))?;
    let Some(model_server_config::Config::ModelConfigList(list)) = parsed.config else {
        return Ok(Vec::new());
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(list.config.len());
    for (i, raw) in list.config.into_iter().enumerate() {
        let config =
            convert(raw).map_err(|e| format!("model config file, config #{}: {e}", i + 1))?;
        if !seen.insert(config.name.clone()) {
            return Err(format!(
                "model config file: model '{}' is configured twice; model names must be unique",
                config.name
            ));
        }
        out.push(config);
    }
    Ok(out)
}

fn convert(raw: serving::ModelConfig) -> Result<ModelConfig, String> {
    let name = ModelName::new(raw.name.as_str()).map_err(|e| format!("name: {e}"))?;
    if raw.base_path.trim().is_empty() {
        return Err(format!("model '{name}': base_path is empty"));
    }
    let policy = convert_policy(raw.model_version_policy)
        .map_err(|e| format!("model '{name}': model_version_policy.{e}"))?;
    let mut version_labels = BTreeMap::new();
    for (label, v) in raw.version_labels {
        if label.is_empty() {
            return Err(format!("model '{name}': version_labels has an empty label"));
        }
        let version = Version::from_i64(v).ok_or_else(|| {
            format!("model '{name}': version_labels '{label}' is {v}; versions are positive")
        })?;
        version_labels.insert(label, version);
    }
    Ok(ModelConfig {
        name,
        base_path: raw.base_path,
        policy,
        version_labels,
    })
}

fn convert_policy(raw: Option<ServableVersionPolicy>) -> Result<VersionPolicy, String> {
    Ok(match raw.and_then(|p| p.policy_choice) {
        None => VersionPolicy::default(),
        // TF Serving reads num_versions 0 (the proto default) as 1.
        Some(PolicyChoice::Latest(l)) => VersionPolicy::Latest(l.num_versions.max(1)),
        Some(PolicyChoice::All(_)) => VersionPolicy::All,
        Some(PolicyChoice::Specific(s)) => {
            if s.versions.is_empty() {
                return Err("specific lists no versions; list at least one".to_string());
            }
            let mut versions = Vec::with_capacity(s.versions.len());
            for v in s.versions {
                let version = Version::from_i64(v).ok_or_else(|| {
                    format!("specific.versions has {v}; versions are positive integers")
                })?;
                versions.push(version);
            }
            versions.sort_unstable();
            versions.dedup();
            VersionPolicy::Specific(versions)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: u64) -> Version {
        Version::new(n).unwrap()
    }

    #[test]
    fn parses_every_policy() {
        let text = r#"
            model_config_list {
              config { name: "mnist" base_path: "/models/mnist" model_platform: "tensorflow" }
              config {
                name: "resnet"
                base_path: "s3://bucket/resnet/"
                model_version_policy { latest { num_versions: 2 } }
                version_labels { key: "stable" value: 3 }
              }
              config { name: "all" base_path: "rel/all" model_version_policy { all {} } }
              config {
                name: "pinned"
                base_path: "file:///models/pinned"
                model_version_policy { specific { versions: 4 versions: 2 versions: 4 } }
              }
            }"#;
        let models = parse_model_config_file(text).unwrap();
        let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["mnist", "resnet", "all", "pinned"]);
        assert_eq!(models[0].policy, VersionPolicy::Latest(1));
        assert_eq!(models[0].base_path, "/models/mnist");
        assert_eq!(models[1].policy, VersionPolicy::Latest(2));
        assert_eq!(models[1].base_path, "s3://bucket/resnet/");
        assert_eq!(
            models[1].version_labels,
            BTreeMap::from([("stable".to_string(), v(3))])
        );
        assert_eq!(models[2].policy, VersionPolicy::All);
        assert_eq!(models[3].policy, VersionPolicy::Specific(vec![v(2), v(4)]));
    }

    #[test]
    fn latest_zero_means_one_and_empty_file_means_no_models() {
        let text = r#"model_config_list { config { name: "m" base_path: "/m"
                      model_version_policy { latest {} } } }"#;
        assert_eq!(
            parse_model_config_file(text).unwrap()[0].policy,
            VersionPolicy::Latest(1)
        );
        assert!(parse_model_config_file("").unwrap().is_empty());
    }

    #[test]
    fn mistakes_name_the_model_and_field() {
        let cases = [
            // A typo in a field name: the parser's message names it.
            (
                r#"model_config_list { config { name: "m" base_pat: "/m" } }"#,
                "base_pat",
            ),
            (
                r#"model_config_list { config { name: "m" base_path: "/m" model_version_policy { lates {} } } }"#,
                "lates",
            ),
            (
                r#"model_config_list { config { name: "m" } }"#,
                "model 'm': base_path is empty",
            ),
            (
                r#"model_config_list { config { name: "a/b" base_path: "/m" } }"#,
                "config #1: name",
            ),
            (
                r#"model_config_list { config { name: "m" base_path: "/m" } config { name: "m" base_path: "/n" } }"#,
                "model 'm' is configured twice",
            ),
            (
                r#"model_config_list { config { name: "m" base_path: "/m" model_version_policy { specific { versions: 0 } } } }"#,
                "model 'm': model_version_policy.specific.versions has 0",
            ),
            (
                r#"model_config_list { config { name: "m" base_path: "/m" model_version_policy { specific { } } } }"#,
                "model 'm': model_version_policy.specific lists no versions",
            ),
            (
                r#"model_config_list { config { name: "m" base_path: "/m" version_labels { key: "canary" value: -1 } } }"#,
                "version_labels 'canary' is -1",
            ),
        ];
        for (text, needle) in cases {
            let err = parse_model_config_file(text).unwrap_err();
            assert!(
                err.contains(needle),
                "{text}\n  gave: {err}\n  wanted: {needle}"
            );
        }
    }

    #[test]
    fn single_model_flags() {
        let m = ModelConfig::single("mnist", "/tmp/monitored").unwrap();
        assert_eq!(m.name.as_str(), "mnist");
        assert_eq!(m.policy, VersionPolicy::Latest(1));
        assert!(
            ModelConfig::single("a b", "/x")
                .unwrap_err()
                .contains("--model_name")
        );
        assert!(
            ModelConfig::single("m", " ")
                .unwrap_err()
                .contains("--model_base_path")
        );
    }
}
