//! Where model files live: turns a base path (a local directory, `file://`, `s3://`,
//! `gs://`, `az://`/`abfs://` URL) into an `object_store` store and prefix, renders a
//! version directory as the URL published in `AvailableVersion.path`, and copies a version
//! from storage into a local directory ([`fetch_version`], used by workers).
//!
//! Cloud credentials come from the environment as `object_store`'s builders read them
//! (`AWS_*`, `GOOGLE_*`, `AZURE_*`), so the same variables as every other tool work.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use aspire_core::Version;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, ObjectStoreScheme};
use url::Url;

use crate::error::DiscoveryError;

mod fetch;

pub use fetch::fetch_version;

/// A base path opened: the store that holds it and the prefix of the base path in it.
#[derive(Debug, Clone)]
pub struct StorageLocation {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
}

/// The immediate children of a base path.
#[derive(Debug, Default)]
pub(crate) struct Children {
    pub(crate) dirs: Vec<String>,
    pub(crate) files: Vec<String>,
}

impl StorageLocation {
    /// Opens `base_path`: a plain path (relative ones are made absolute against the
    /// current directory), or a `file://`, `s3://`, `gs://`, `az://`, `abfs://` URL.
    /// Nothing is read yet, so a base path that does not exist opens fine.
    pub fn open(base_path: &str) -> Result<Self, DiscoveryError> {
        let invalid = |reason: String| DiscoveryError::InvalidBasePath {
            base_path: base_path.to_string(),
            reason,
        };
        let url = to_url(base_path).map_err(invalid)?;
        let url_string = url.as_str().trim_end_matches('/').to_string();
        if url.scheme() == "file" {
            let fs_path = url.to_file_path().map_err(|()| {
                invalid("a file URL must name no host, e.g. file:///models/mnist".to_string())
            })?;
            let prefix =
                ObjectPath::from_absolute_path(&fs_path).map_err(|e| invalid(e.to_string()))?;
            return Ok(Self {
                store: Arc::new(LocalFileSystem::new()),
                prefix,
                url: url_string,
            });
        }
        const SUPPORTED: &str = "use a local path or a file://, s3://, gs://, az:// or abfs:// URL";
        let (scheme, _) = ObjectStoreScheme::parse(&url).map_err(|_| {
            invalid(if url.host_str().is_none_or(str::is_empty) {
                format!(
                    "the URL names no bucket or container, e.g. {}://bucket/models/mnist",
                    url.scheme()
                )
            } else {
                format!("unknown storage scheme '{}'; {SUPPORTED}", url.scheme())
            })
        })?;
        let env_prefix = match scheme {
            ObjectStoreScheme::AmazonS3 => "AWS_",
            ObjectStoreScheme::GoogleCloudStorage => "GOOGLE_",
            ObjectStoreScheme::MicrosoftAzure => "AZURE_",
            _ => {
                return Err(invalid(format!(
                    "'{}' URLs are not supported; {SUPPORTED}",
                    url.scheme()
                )));
            }
        };
        if !cfg!(feature = "cloud") {
            return Err(invalid(
                "this build has no cloud storage support (aspire-discovery's cargo feature `cloud`)".to_string(),
            ));
        }
        let options: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with(env_prefix))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let (store, prefix) =
            object_store::parse_url_opts(&url, options).map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            store: Arc::from(store),
            prefix,
            url: url_string,
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The base path's prefix inside the store.
    pub fn prefix(&self) -> &ObjectPath {
        &self.prefix
    }

    /// The base path as a URL, without a trailing `/` (`file:///models/mnist`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of version `version`'s directory (`file:///models/mnist/3`,
    /// `s3://bucket/mnist/3`): what [`fetch_version`] takes.
    pub fn version_url(&self, version: Version) -> String {
        self.child_url(&version.to_string())
    }

    /// The URL of the version directory `name` as listed (one named `007` keeps its
    /// name). Version names are digits, so nothing needs escaping.
    pub fn child_url(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    /// Lists the base path's immediate children. A local base path that does not exist
    /// lists as empty (object stores cannot tell the two apart either).
    pub(crate) async fn list_children(&self) -> Result<Children, DiscoveryError> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.prefix))
            .await
            .map_err(|e| DiscoveryError::storage(&self.url, e))?;
        let name_under = |p: &ObjectPath| {
            p.prefix_match(&self.prefix)?
                .next()
                .map(|part| part.as_ref().to_string())
        };
        Ok(Children {
            dirs: listing
                .common_prefixes
                .iter()
                .filter_map(name_under)
                .collect(),
            files: listing
                .objects
                .iter()
                .filter_map(|o| name_under(&o.location))
                .collect(),
        })
    }

    /// Every file under child directory `dir`, by path relative to it (`model.pt`,
    /// `extra/vocab.txt`).
    pub(crate) async fn list_files(
        &self,
        dir: &str,
    ) -> Result<BTreeMap<String, ObjectMeta>, DiscoveryError> {
        list_recursive(
            &self.store,
            &self.prefix.clone().join(dir),
            &format!("{}/{dir}", self.url),
        )
        .await
    }

    /// Reads one file of child directory `dir` whole.
    pub(crate) async fn read(&self, dir: &str, file: &str) -> Result<Vec<u8>, DiscoveryError> {
        let location = self.prefix.clone().join(dir).join(file);
        let url = format!("{}/{dir}/{file}", self.url);
        let got = self
            .store
            .get(&location)
            .await
            .map_err(|e| DiscoveryError::storage(&url, e))?;
        let bytes = got
            .bytes()
            .await
            .map_err(|e| DiscoveryError::storage(&url, e))?;
        Ok(bytes.to_vec())
    }
}

async fn list_recursive(
    store: &Arc<dyn ObjectStore>,
    prefix: &ObjectPath,
    url: &str,
) -> Result<BTreeMap<String, ObjectMeta>, DiscoveryError> {
    let objects: Vec<ObjectMeta> = store
        .list(Some(prefix))
        .try_collect()
        .await
        .map_err(|e| DiscoveryError::storage(url, e))?;
    let mut files = BTreeMap::new();
    for meta in objects {
        let Some(parts) = meta.location.prefix_match(prefix) else {
            continue;
        };
        let relative: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
        // An object named exactly like the prefix (a directory marker) is not a file in it.
        if !relative.is_empty() {
            files.insert(relative.join("/"), meta);
        }
    }
    Ok(files)
}

/// Turns a base path into a URL; plain paths become absolute `file://` URLs.
fn to_url(base_path: &str) -> Result<Url, String> {
    let trimmed = base_path.trim();
    if trimmed.contains("://") || trimmed.starts_with("file:") {
        return Url::parse(trimmed).map_err(|e| format!("not a valid URL ({e})"));
    }
    let absolute =
        std::path::absolute(trimmed).map_err(|e| format!("cannot make it absolute ({e})"))?;
    Url::from_file_path(normalize(&absolute)).map_err(|()| "not an absolute path".to_string())
}

/// Drops `.` and resolves `..` lexically: object store paths may not contain them.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_file_paths_become_file_urls() {
        let loc = StorageLocation::open("/tmp/monitored/").unwrap();
        assert_eq!(loc.url(), "file:///tmp/monitored");
        assert_eq!(loc.prefix().as_ref(), "tmp/monitored");
        assert_eq!(
            loc.version_url(Version::new(3).unwrap()),
            "file:///tmp/monitored/3"
        );
        let loc = StorageLocation::open("file:///tmp/a/../monitored").unwrap();
        assert_eq!(loc.url(), "file:///tmp/monitored");
        let loc = StorageLocation::open("/tmp/./x/../with space").unwrap();
        assert_eq!(loc.url(), "file:///tmp/with%20space");
        assert_eq!(loc.prefix().as_ref(), "tmp/with space");
        let relative = StorageLocation::open("models/mnist").unwrap();
        let cwd = std::env::current_dir().unwrap();
        let expected = Url::from_file_path(cwd.join("models/mnist")).unwrap();
        assert_eq!(relative.url(), expected.as_str());
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason() {
        for (bad, needle) in [
            ("ftp://host/models", "unknown storage scheme 'ftp'"),
            ("memory:///x", "'memory' URLs are not supported"),
            ("file://host/models", "must name no host"),
            ("s3://", "names no bucket"),
            ("s3 ://x", "not a valid URL"),
        ] {
            let err = StorageLocation::open(bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains(needle), "{bad}: {err}");
        }
    }

    #[cfg(not(feature = "cloud"))]
    #[test]
    fn cloud_urls_need_the_cloud_feature() {
        let err = StorageLocation::open("s3://bucket/m")
            .unwrap_err()
            .to_string();
        assert!(err.contains("feature `cloud`"), "{err}");
    }

    #[cfg(feature = "cloud")]
    #[test]
    fn cloud_urls_open_without_touching_the_network() {
        let loc = StorageLocation::open("s3://bucket/models/mnist/").unwrap();
        assert_eq!(loc.prefix().as_ref(), "models/mnist");
        assert_eq!(
            loc.version_url(Version::new(7).unwrap()),
            "s3://bucket/models/mnist/7"
        );
        let loc = StorageLocation::open("gs://bucket/mnist").unwrap();
        assert_eq!(loc.url(), "gs://bucket/mnist");
    }
}
