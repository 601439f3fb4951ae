//! The registry key schema, the one place keys are built and parsed.
//!
//! ```text
//! <prefix>/models/<model>/available   JSON AvailableVersions, written by discovery
//! <prefix>/models/<model>/aspired     JSON AspiredVersions, written by discovery
//! <prefix>/models/<model>/pinned      plain text "1" or "1,2", written by operators
//! <prefix>/workers/<worker-id>        JSON WorkerRecord, written by each worker under a lease
//! ```

use std::fmt;

use crate::model::ModelName;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/aspire";

/// Which key of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKey {
    /// Every complete version found in storage.
    Available,
    /// The versions the version policy selects.
    Aspired,
    /// The operator's override of `Aspired`.
    Pinned,
}

impl ModelKey {
    /// The key's last segment.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKey::Available => "available",
            ModelKey::Aspired => "aspired",
            ModelKey::Pinned => "pinned",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [ModelKey::Available, ModelKey::Aspired, ModelKey::Pinned]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

impl fmt::Display for ModelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a key under the prefix means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedKey {
    /// One of a model's keys.
    Model(ModelName, ModelKey),
    /// A worker's registration.
    Worker(String),
    /// A key under the prefix that means nothing (a typo): the sentence says why.
    Unknown(String),
}

/// Builds and parses keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySchema {
    prefix: String,
}

impl Default for KeySchema {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl KeySchema {
    /// A schema under `prefix`; a trailing `/` is dropped, a missing leading `/` added.
    pub fn new(prefix: &str) -> Self {
        let trimmed = prefix.trim_end_matches('/');
        let prefix = if trimmed.starts_with('/') {
            trimmed.to_string()
        } else {
            format!("/{trimmed}")
        };
        Self { prefix }
    }

    /// The prefix, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every key of the schema starts with this.
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// The prefix of all model keys.
    pub fn models_root(&self) -> String {
        format!("{}/models/", self.prefix)
    }

    /// The prefix of all worker keys.
    pub fn workers_root(&self) -> String {
        format!("{}/workers/", self.prefix)
    }

    /// `<prefix>/models/<model>/<key>`.
    pub fn model_key(&self, model: &ModelName, key: ModelKey) -> String {
        format!("{}/models/{}/{}", self.prefix, model, key)
    }

    /// `<prefix>/workers/<id>`.
    pub fn worker_key(&self, worker_id: &str) -> String {
        format!("{}/workers/{}", self.prefix, worker_id)
    }

    /// What `key` means; `None` when it is not under this prefix at all.
    pub fn parse(&self, key: &str) -> Option<ParsedKey> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        Some(match parts.as_slice() {
            ["models", model, key] => match (ModelName::new(*model), ModelKey::parse(key)) {
                (Ok(m), Some(k)) => ParsedKey::Model(m, k),
                (Err(e), _) => ParsedKey::Unknown(format!("key {key:?}: {e}")),
                (_, None) => ParsedKey::Unknown(format!(
                    "key {:?}: unknown model key {key:?}; expected available, aspired or pinned",
                    self.model_key_hint(model)
                )),
            },
            ["workers", id] if valid_worker_id(id) => ParsedKey::Worker((*id).to_string()),
            _ => ParsedKey::Unknown(format!(
                "key {key:?} is not one of {p}/models/<model>/{{available,aspired,pinned}} or {p}/workers/<worker-id>",
                p = self.prefix
            )),
        })
    }

    fn model_key_hint(&self, model: &str) -> String {
        format!("{}/models/{}/...", self.prefix, model)
    }
}

/// Worker ids become one key segment: non-empty, no `/`, printable ASCII.
pub fn valid_worker_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 253 && id.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse_round_trip() {
        let s = KeySchema::new("/aspire/");
        let m = ModelName::new("mnist").unwrap();
        let k = s.model_key(&m, ModelKey::Pinned);
        assert_eq!(k, "/aspire/models/mnist/pinned");
        assert_eq!(s.parse(&k), Some(ParsedKey::Model(m, ModelKey::Pinned)));
        assert_eq!(s.worker_key("w-1"), "/aspire/workers/w-1");
        assert_eq!(
            s.parse("/aspire/workers/w-1"),
            Some(ParsedKey::Worker("w-1".into()))
        );
        assert_eq!(KeySchema::new("team").prefix(), "/team");
    }

    #[test]
    fn typos_are_unknown_with_a_reason() {
        let s = KeySchema::default();
        match s.parse("/aspire/models/mnist/pined") {
            Some(ParsedKey::Unknown(why)) => assert!(why.contains("pinned"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.parse("/aspire/model/mnist/pinned"),
            Some(ParsedKey::Unknown(_))
        ));
        assert!(matches!(
            s.parse("/aspire/workers/"),
            Some(ParsedKey::Unknown(_))
        ));
        assert_eq!(s.parse("/other/models/mnist/pinned"), None);
        assert_eq!(s.parse("/aspirex/models/mnist/pinned"), None);
    }
}
