//! Copying a version directory from storage into a local directory, for workers: the
//! copy is assembled beside its destination and renamed into place, so a reader never
//! sees a partial one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use object_store::{ObjectMeta, ObjectStoreExt};
use tokio::io::AsyncWriteExt;

use super::{StorageLocation, list_recursive};
use crate::error::DiscoveryError;

/// Copies every file under the version directory `path_url` (a URL from
/// [`StorageLocation::version_url`], or a plain path) into `dest_dir`, keeping
/// subdirectories. The copy is assembled in a hidden sibling directory and renamed into
/// place at the end, so `dest_dir` either does not exist or is complete; an existing
/// `dest_dir` is replaced. A version directory with no files is an error, so a mistyped
/// URL never yields an empty "complete" copy.
pub async fn fetch_version(path_url: &str, dest_dir: &Path) -> Result<(), String> {
    fetch(path_url, dest_dir).await.map_err(|e| e.to_string())
}

async fn fetch(path_url: &str, dest_dir: &Path) -> Result<(), DiscoveryError> {
    let location = StorageLocation::open(path_url)?;
    let fetch_error = |reason: &str| DiscoveryError::Fetch {
        location: location.url.clone(),
        reason: reason.to_string(),
    };
    let files = list_recursive(&location.store, &location.prefix, &location.url).await?;
    if files.is_empty() {
        return Err(fetch_error("it holds no files"));
    }
    let (Some(parent), Some(name)) = (dest_dir.parent(), dest_dir.file_name()) else {
        return Err(DiscoveryError::io(
            dest_dir,
            std::io::Error::other("the destination needs a parent directory"),
        ));
    };
    tokio::fs::create_dir_all(parent)
        .await
        .map_err(|e| DiscoveryError::io(parent, e))?;
    // Unique per process and call, so two fetches of one version never share a staging dir.
    static FETCHES: AtomicU64 = AtomicU64::new(0);
    let staging = parent.join(format!(
        ".{}.partial-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        FETCHES.fetch_add(1, Ordering::Relaxed)
    ));
    let copied = copy_all(&location, &files, &staging).await;
    let placed = match copied {
        Ok(()) => place(&staging, dest_dir).await,
        Err(e) => Err(e),
    };
    if placed.is_err() {
        let _ = tokio::fs::remove_dir_all(&staging).await;
    }
    placed
}

async fn copy_all(
    location: &StorageLocation,
    files: &BTreeMap<String, ObjectMeta>,
    staging: &Path,
) -> Result<(), DiscoveryError> {
    for (relative, meta) in files {
        let target = relative
            .split('/')
            .fold(staging.to_path_buf(), |p, part| p.join(part));
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| DiscoveryError::io(dir, e))?;
        }
        let url = format!("{}/{relative}", location.url);
        let got = location
            .store
            .get(&meta.location)
            .await
            .map_err(|e| DiscoveryError::storage(&url, e))?;
        let mut stream = got.into_stream();
        let mut file = tokio::fs::File::create(&target)
            .await
            .map_err(|e| DiscoveryError::io(&target, e))?;
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| DiscoveryError::storage(&url, e))?;
            file.write_all(&chunk)
                .await
                .map_err(|e| DiscoveryError::io(&target, e))?;
            written += chunk.len() as u64;
        }
        // Durable before the rename publishes it, so a crash never leaves a torn copy.
        file.sync_all()
            .await
            .map_err(|e| DiscoveryError::io(&target, e))?;
        if written != meta.size {
            return Err(DiscoveryError::Fetch {
                location: url,
                reason: format!(
                    "it was {} bytes when listed but {written} bytes were read; it changed during the copy",
                    meta.size
                ),
            });
        }
    }
    Ok(())
}

async fn place(staging: &Path, dest_dir: &Path) -> Result<(), DiscoveryError> {
    match tokio::fs::remove_dir_all(dest_dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(DiscoveryError::io(dest_dir, e)),
    }
    tokio::fs::rename(staging, dest_dir)
        .await
        .map_err(|e| DiscoveryError::io(dest_dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn takes_plain_paths_and_leaves_nothing_behind_on_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src/1");
        std::fs::create_dir_all(src.join("empty_subdir")).unwrap();
        let cache = tmp.path().join("cache");
        let err = fetch_version(src.to_str().unwrap(), &cache.join("1"))
            .await
            .unwrap_err();
        assert!(err.contains("holds no files"), "{err}");
        assert!(
            !cache.exists(),
            "a failed fetch created {}",
            cache.display()
        );

        std::fs::write(src.join("model.pt"), b"w").unwrap();
        fetch_version(src.to_str().unwrap(), &cache.join("1"))
            .await
            .unwrap();
        assert_eq!(std::fs::read(cache.join("1/model.pt")).unwrap(), b"w");
        let entries: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["1"]);
    }
}
