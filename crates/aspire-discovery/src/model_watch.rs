//! One model's discovery state between polls: the listing of each version directory (a
//! version is complete once it has `model.pt` and lists the same twice in a row), the
//! names already reported as ignored, the values last published, and whether the base
//! path is in trouble. [`crate::storage_poller`] owns one per configured model.

use std::collections::{BTreeMap, BTreeSet};

use aspire_core::model::list_versions;
use aspire_core::{AspiredVersions, AvailableVersion, AvailableVersions, SignatureMap, Version};
use aspire_registry::Registry;
use object_store::ObjectMeta;
use tracing::{info, warn};

use crate::model_config::ModelConfig;
use crate::storage::StorageLocation;

/// The file that makes a version directory loadable.
pub const MODEL_FILE: &str = "model.pt";
/// The optional signatures file beside it.
pub const SIGNATURE_FILE: &str = "signature.json";
/// `signature.json` is read whole; anything this large is a mistake, not a signature.
const MAX_SIGNATURE_BYTES: u64 = 1 << 20;

/// Why a base path's last published values are being kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProblemKind {
    Unreadable,
    NoCompleteVersion,
}

/// One version directory as last listed.
struct VersionDir {
    /// The directory's name (`7`, or `007`).
    name: String,
    /// `None` before the first listing, so even an empty directory needs two polls.
    listing: Option<BTreeMap<String, ObjectMeta>>,
    /// The listing equals the one before it.
    stable: bool,
    /// The current stable listing was judged; judged once per listing, so a bad
    /// `signature.json` is read and reported once until the directory changes.
    evaluated: bool,
    /// The entry of the last stable, loadable listing. Kept while the directory changes,
    /// so touching a served version does not unload it until the change settles.
    last_good: Option<AvailableVersion>,
}

pub(crate) struct ModelWatch {
    pub(crate) config: ModelConfig,
    location: Result<StorageLocation, String>,
    versions: BTreeMap<Version, VersionDir>,
    pub(crate) ignored: BTreeSet<String>,
    published_available: Option<AvailableVersions>,
    published_aspired: Option<AspiredVersions>,
    problem: Option<(ProblemKind, String)>,
}

impl ModelWatch {
    pub(crate) fn new(config: ModelConfig) -> Self {
        let location = StorageLocation::open(&config.base_path).map_err(|e| e.to_string());
        Self {
            config,
            location,
            versions: BTreeMap::new(),
            ignored: BTreeSet::new(),
            published_available: None,
            published_aspired: None,
            problem: None,
        }
    }

    /// Takes a changed config. A new base path starts its versions afresh; what was
    /// published stays the baseline, so an unchanged result is not written again.
    pub(crate) fn reconfigure(&mut self, config: ModelConfig) {
        if config.base_path == self.config.base_path {
            self.config = config;
            return;
        }
        let mut fresh = Self::new(config);
        fresh.published_available = self.published_available.take();
        fresh.published_aspired = self.published_aspired.take();
        *self = fresh;
    }

    pub(crate) fn problem(&self) -> Option<&str> {
        self.problem.as_ref().map(|(_, why)| why.as_str())
    }

    /// Some version directory changed since the poll before, or was listed once only: a
    /// further poll is needed to know whether it is complete.
    pub(crate) fn settling(&self) -> bool {
        self.versions.values().any(|d| !d.stable)
    }

    pub(crate) async fn poll(&mut self, registry: &dyn Registry) {
        let location = match &self.location {
            Ok(location) => location.clone(),
            Err(why) => {
                let why = why.clone();
                self.set_problem(ProblemKind::Unreadable, why);
                return self.log_aspiring();
            }
        };
        match self.scan(&location).await {
            Err(why) => self.set_problem(ProblemKind::Unreadable, why),
            // Version directories still settling (every one does on its first poll):
            // nothing is wrong yet, so no warning.
            Ok(complete) if complete.is_empty() && self.versions.values().any(|d| !d.stable) => {}
            Ok(complete) if complete.is_empty() => self.set_problem(
                ProblemKind::NoCompleteVersion,
                format!("base path {} has no complete version (a version directory with {MODEL_FILE} that stopped changing)", location.url()),
            ),
            Ok(complete) => {
                if self.problem.take().is_some() {
                    info!(model = %self.config.name, "base path {} of model {} has complete versions again", location.url(), self.config.name);
                }
                let aspired = self.config.policy.select(&complete.iter().map(|v| v.version).collect::<Vec<_>>());
                self.publish(registry, AvailableVersions { versions: complete }, AspiredVersions { versions: aspired }).await;
            }
        }
        self.log_aspiring();
    }

    fn log_aspiring(&self) {
        let name = &self.config.name;
        match &self.published_aspired {
            Some(a) => {
                info!(model = %name, "aspiring version(s) [{}] of model {name}", list_versions(a.versions.iter().copied()))
            }
            None => info!(model = %name, "aspiring no version of model {name} yet"),
        }
    }

    fn set_problem(&mut self, kind: ProblemKind, why: String) {
        // Once per transition: a storage error's text may differ every poll.
        if self.problem.as_ref().map(|(k, _)| *k) != Some(kind) {
            let kept = match &self.published_available {
                Some(a) => format!(
                    "keeping the last published versions [{}]",
                    list_versions(a.numbers())
                ),
                None => "nothing was published for it yet".to_string(),
            };
            warn!(model = %self.config.name, "model {}: {why}; {kept}", self.config.name);
        }
        self.problem = Some((kind, why));
    }

    /// Lists the base path and each version directory; returns the complete versions.
    async fn scan(&mut self, location: &StorageLocation) -> Result<Vec<AvailableVersion>, String> {
        let children = location.list_children().await.map_err(|e| e.to_string())?;
        let mut found: BTreeMap<Version, String> = BTreeMap::new();
        let mut others: Vec<String> = children.files;
        for dir in children.dirs {
            match dir.parse::<Version>() {
                // `7` wins over `007`: the canonical name is the one tools write.
                Ok(v) if found.get(&v).is_none_or(|kept| *kept != v.to_string()) => {
                    if let Some(replaced) = found.insert(v, dir) {
                        others.push(replaced);
                    }
                }
                _ => others.push(dir),
            }
        }
        self.note_ignored(others);
        self.versions.retain(|v, d| found.get(v) == Some(&d.name));

        let listings =
            futures::future::join_all(found.iter().map(|(v, name)| async move {
                (*v, name.clone(), location.list_files(name).await)
            }))
            .await;
        let mut complete = Vec::new();
        for (version, name, listing) in listings {
            let listing = listing.map_err(|e| e.to_string())?;
            let dir = self.versions.entry(version).or_insert_with(|| VersionDir {
                name,
                listing: None,
                stable: false,
                evaluated: false,
                last_good: None,
            });
            if dir.listing.as_ref() == Some(&listing) {
                dir.stable = true;
            } else {
                dir.listing = Some(listing);
                dir.stable = false;
                dir.evaluated = false;
            }
            if dir.stable && !dir.evaluated {
                evaluate(&self.config, location, version, dir).await;
            }
            complete.extend(dir.last_good.clone());
        }
        Ok(complete)
    }

    fn note_ignored(&mut self, names: Vec<String>) {
        let present: BTreeSet<String> = names.into_iter().filter(|n| !n.is_empty()).collect();
        for name in &present {
            if !self.ignored.contains(name) {
                info!(model = %self.config.name, "ignoring {name:?} under the base path of model {}: not a version directory (a positive integer)", self.config.name);
            }
        }
        // Forget names that left, so short-lived temporary directories do not pile up.
        self.ignored = present;
    }

    async fn publish(
        &mut self,
        registry: &dyn Registry,
        available: AvailableVersions,
        aspired: AspiredVersions,
    ) {
        let name = self.config.name.clone();
        let available_changed = self.published_available.as_ref() != Some(&available);
        let aspired_changed = self.published_aspired.as_ref() != Some(&aspired);
        // Readers look up aspired versions in `available`, so never let `aspired` name a
        // version the published `available` lacks: aspired goes first only when every
        // version it names is already published.
        let old = self
            .published_available
            .as_ref()
            .map(AvailableVersions::numbers)
            .unwrap_or_default();
        let aspired_first = aspired.versions.iter().all(|v| old.contains(v));
        for aspired_turn in [aspired_first, !aspired_first] {
            let result = if aspired_turn && aspired_changed {
                let r = registry.put_aspired(&name, &aspired).await;
                if r.is_ok() {
                    self.published_aspired = Some(aspired.clone());
                }
                r
            } else if !aspired_turn && available_changed {
                let r = registry.put_available(&name, &available).await;
                if r.is_ok() {
                    self.published_available = Some(available.clone());
                }
                r
            } else {
                Ok(())
            };
            if let Err(e) = result {
                // Retried next poll: `published_*` still differ from what was found.
                return warn!(model = %name, "could not publish the versions of model {name}: {e}");
            }
        }
    }
}

/// Decides whether a stable version directory is loadable and, if so, what it serves.
async fn evaluate(
    config: &ModelConfig,
    location: &StorageLocation,
    version: Version,
    dir: &mut VersionDir,
) {
    let model = &config.name;
    let listing = dir.listing.as_ref();
    let verdict = if !listing.is_some_and(|l| l.contains_key(MODEL_FILE)) {
        Err(format!("it has no {MODEL_FILE}"))
    } else if let Some(meta) = listing.and_then(|l| l.get(SIGNATURE_FILE)) {
        if meta.size > MAX_SIGNATURE_BYTES {
            Err(format!(
                "{SIGNATURE_FILE} is {} bytes; the limit is {MAX_SIGNATURE_BYTES}",
                meta.size
            ))
        } else {
            match location.read(&dir.name, SIGNATURE_FILE).await {
                Ok(bytes) => SignatureMap::from_json(&bytes),
                Err(e) => {
                    // Not a verdict on the version: the read is retried next poll, and
                    // what was served from this directory until now stays.
                    warn!(model = %model, "version {version} of model {model}: {e}");
                    return;
                }
            }
        }
    } else {
        Ok(SignatureMap::default_for_untyped_model())
    };
    dir.evaluated = true;
    match verdict {
        Ok(signatures) => {
            dir.last_good = Some(AvailableVersion {
                version,
                path: location.child_url(&dir.name),
                signatures,
            });
        }
        Err(why) => {
            warn!(model = %model, "version {version} of model {model} is not available: {why}");
            dir.last_good = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aspire_registry::MemoryRegistry;

    fn write(base: &std::path::Path, relative: &str, bytes: &[u8]) {
        let path = base.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn watch(base: &std::path::Path) -> ModelWatch {
        let mut config = ModelConfig::single("m", base.to_str().unwrap()).unwrap();
        config.policy = aspire_core::VersionPolicy::All;
        ModelWatch::new(config)
    }

    async fn available(registry: &MemoryRegistry) -> Vec<AvailableVersion> {
        let state = registry.state().await.unwrap();
        let m = &state.models[&aspire_core::ModelName::new("m").unwrap()];
        m.available.clone().unwrap().versions
    }

    #[tokio::test]
    async fn a_served_version_that_changes_stays_until_the_change_settles() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "1/model.pt", b"v1");
        write(tmp.path(), "2/model.pt", b"v2");
        let registry = MemoryRegistry::default();
        let mut w = watch(tmp.path());
        for _ in 0..2 {
            w.poll(&registry).await;
        }
        let nums = |a: Vec<AvailableVersion>| a.iter().map(|v| v.version.get()).collect::<Vec<_>>();
        assert_eq!(nums(available(&registry).await), [1, 2]);

        std::fs::remove_file(tmp.path().join("1/model.pt")).unwrap();
        w.poll(&registry).await;
        assert_eq!(nums(available(&registry).await), [1, 2], "changing: kept");
        w.poll(&registry).await;
        assert_eq!(
            nums(available(&registry).await),
            [2],
            "settled without model.pt: gone"
        );
    }

    #[tokio::test]
    async fn the_canonical_name_wins_over_leading_zeros() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "007/model.pt", b"padded");
        write(tmp.path(), "7/model.pt", b"canonical");
        let registry = MemoryRegistry::default();
        let mut w = watch(tmp.path());
        for _ in 0..2 {
            w.poll(&registry).await;
        }
        let found = available(&registry).await;
        assert_eq!(found.len(), 1);
        assert!(found[0].path.ends_with("/7"), "{}", found[0].path);
        assert!(w.ignored.contains("007"));
    }
}
