//! Model names and version numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The name of a served model, as clients put it in `ModelSpec.name`.
///
/// It becomes part of registry keys and local paths, so it is limited to ASCII letters,
/// digits, `_`, `-` and `.` (and may not be `.` or `..`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelName(String);

/// Why a model name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model name {name:?}: use 1-128 ASCII letters, digits, '_', '-' or '.'")]
pub struct InvalidModelName {
    /// The refused name.
    pub name: String,
}

impl ModelName {
    /// Checks and wraps a model name.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidModelName> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= 128
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if ok {
            Ok(Self(name))
        } else {
            Err(InvalidModelName { name })
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ModelName {
    type Err = InvalidModelName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for ModelName {
    type Error = InvalidModelName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<ModelName> for String {
    fn from(n: ModelName) -> String {
        n.0
    }
}

/// A model version: a positive integer, the name of its directory in storage.
///
/// Deserializing checks it as [`Version::from_i64`] does, so a registry value naming
/// version 0 or one past `i64::MAX` is refused as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Version(u64);

/// Why a version number was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid version {text:?}: a version is a positive integer")]
pub struct InvalidVersion {
    /// The refused text.
    pub text: String,
}

impl Version {
    /// Wraps a positive version number; `None` for 0.
    pub fn new(v: u64) -> Option<Self> {
        (v > 0).then_some(Self(v))
    }

    /// Converts from protobuf's `int64`; `None` unless positive.
    pub fn from_i64(v: i64) -> Option<Self> {
        u64::try_from(v).ok().and_then(Self::new)
    }

    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The number as protobuf's `int64` (versions above `i64::MAX` are refused on parse).
    pub fn as_i64(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }
}

impl TryFrom<u64> for Version {
    type Error = InvalidVersion;
    fn try_from(v: u64) -> Result<Self, Self::Error> {
        i64::try_from(v)
            .ok()
            .and_then(Self::from_i64)
            .ok_or_else(|| InvalidVersion {
                text: v.to_string(),
            })
    }
}

impl From<Version> for u64 {
    fn from(v: Version) -> u64 {
        v.0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Version {
    type Err = InvalidVersion;
    /// Parses a directory name or key value: decimal digits only, no sign, no spaces.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidVersion {
            text: s.to_string(),
        };
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let v: i64 = s.parse().map_err(|_| err())?;
        Self::from_i64(v).ok_or_else(err)
    }
}

/// Formats versions as `1, 2, 3` for messages.
pub fn list_versions(versions: impl IntoIterator<Item = Version>) -> String {
    let list: Vec<String> = versions.into_iter().map(|v| v.to_string()).collect();
    if list.is_empty() {
        "none".to_string()
    } else {
        list.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names() {
        assert!(ModelName::new("mnist").is_ok());
        assert!(ModelName::new("resnet-18_v2.pt").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "mnïst", &"x".repeat(129)] {
            assert!(ModelName::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn versions_parse_only_positive_decimal() {
        assert_eq!("12".parse::<Version>().unwrap().get(), 12);
        assert_eq!("007".parse::<Version>().unwrap().get(), 7);
        for bad in [
            "0",
            "-1",
            "+1",
            " 1",
            "1.0",
            "abc",
            "",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(Version::from_i64(-3), None);
        assert_eq!(list_versions([Version(1), Version(3)]), "1, 3");
        assert_eq!(list_versions([]), "none");
    }

    #[test]
    fn serde_round_trip() {
        let n: ModelName = serde_json::from_str("\"mnist\"").unwrap();
        assert_eq!(n.as_str(), "mnist");
        assert!(serde_json::from_str::<ModelName>("\"a/b\"").is_err());
        assert_eq!(serde_json::to_string(&Version(4)).unwrap(), "4");
        assert_eq!(serde_json::from_str::<Version>("4").unwrap(), Version(4));
        for bad in ["0", "-1", "9223372036854775808", "1.5", "\"1\""] {
            assert!(
                serde_json::from_str::<Version>(bad).is_err(),
                "{bad} accepted"
            );
        }
        // As a map key (a worker record's versions), it goes through the same check.
        let map: std::collections::BTreeMap<Version, u8> =
            serde_json::from_str(r#"{"3": 1}"#).unwrap();
        assert_eq!(map.keys().copied().collect::<Vec<_>>(), vec![Version(3)]);
        assert_eq!(serde_json::to_string(&map).unwrap(), r#"{"3":1}"#);
        assert!(
            serde_json::from_str::<std::collections::BTreeMap<Version, u8>>(r#"{"0": 1}"#).is_err()
        );
    }
}
