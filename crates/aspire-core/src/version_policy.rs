//! Version policies: which of the versions found in storage a model aspires to serve,
//! as TensorFlow Serving's `model_version_policy` chooses them.

use serde::{Deserialize, Serialize};

use crate::model::Version;

/// Which versions of a model to serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionPolicy {
    /// The highest N versions (TF Serving's default is the latest 1).
    Latest(u32),
    /// Every version found.
    All,
    /// Exactly these versions, those of them that exist.
    Specific(Vec<Version>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// The aspired versions among `available`, ascending.
    pub fn select(&self, available: &[Version]) -> Vec<Version> {
        let mut sorted = available.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        match self {
            VersionPolicy::Latest(n) => {
                let n = (*n).max(1) as usize;
                let skip = sorted.len().saturating_sub(n);
                sorted.split_off(skip)
            }
            VersionPolicy::All => sorted,
            VersionPolicy::Specific(wanted) => {
                sorted.retain(|v| wanted.contains(v));
                sorted
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(list: &[u64]) -> Vec<Version> {
        list.iter().map(|n| Version::new(*n).unwrap()).collect()
    }

    #[test]
    fn latest_all_specific() {
        let found = v(&[3, 1, 10, 2]);
        assert_eq!(VersionPolicy::default().select(&found), v(&[10]));
        assert_eq!(VersionPolicy::Latest(2).select(&found), v(&[3, 10]));
        assert_eq!(VersionPolicy::Latest(9).select(&found), v(&[1, 2, 3, 10]));
        // num_versions: 0 in a TF Serving config means the default, 1.
        assert_eq!(VersionPolicy::Latest(0).select(&found), v(&[10]));
        assert_eq!(VersionPolicy::All.select(&found), v(&[1, 2, 3, 10]));
        assert_eq!(
            VersionPolicy::Specific(v(&[2, 4, 10])).select(&found),
            v(&[2, 10])
        );
        assert!(VersionPolicy::Latest(1).select(&[]).is_empty());
    }
}
